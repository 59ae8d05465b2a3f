"""Continuous batching: the scheduler that owns the model and decodes every running request together,
one token each per step (serve.py's engine).

Between two decoding steps the scheduler takes the requests that came meanwhile: it runs their prompts
together (right-padded, one forward pass) into a cache of their own, samples each first token and copies
each prompt's keys and values into a free row of the batch's KVCache. Then one forward pass decodes every
row, each sequence at its own position: continuous batching, as vLLM and TGI do it. Rows that sample alike
are sampled in one call (a short answer is a few tokens: per-row work adds up). A request never waits for
another to finish, only for a free row when max_batch_size rows are taken. A finished or abandoned request
frees its row at once (the last row moves into the gap, so the rows in use are always the first ones).

Trade-offs: each row reserves max_seq_len positions up front (no paged memory: simple, and small models
have short contexts); a long prompt's prefill delays the running rows by one forward pass (no chunked
prefill); one process, one device.
"""
import asyncio
import copy
import io
import queue
import sys
import traceback
from dataclasses import dataclass, field

import torch

from generate import TextStreamer
from hardware import autocast
from model import KVCache, sample_next_token


# --- turning tokens into text ------------------------------------------------------------------

class TextOutput:
    """An answer's text as its tokens arrive: what may be sent so far, and where a stop string ends it.

    Held back: the bytes of a character that is not complete yet (TextStreamer, as generate.py prints),
    and an end of the text that could be the start of a stop string."""

    def __init__(self, tokenizer, stop):
        self.printed = io.StringIO()
        self.streamer = TextStreamer(tokenizer, out=self.printed)
        self.stop, self.sent, self.end = stop, 0, None  # end: where a stop string cut the text

    def add(self, token_id):
        """The text that may be sent now, and whether a stop string ended the answer."""
        self.streamer([token_id])
        text = self.printed.getvalue()
        # A stop string cannot start before `sent`: whatever could have started one was held back.
        hits = [i for i in (text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            self.end = min(hits)
            return self._send_up_to(self.end), True
        held = max((k for s in self.stop for k in range(1, min(len(s), len(text) - self.sent + 1))
                    if text.endswith(s[:k])), default=0)
        return self._send_up_to(len(text) - held), False

    def rest(self):
        """What is left to send when the answer ends."""
        return self._send_up_to(len(self.printed.getvalue()) if self.end is None else self.end)

    def _send_up_to(self, end):
        delta, self.sent = self.printed.getvalue()[self.sent:end], end
        return delta


# --- the scheduler: continuous batching --------------------------------------------------------

class BatchCache(KVCache):
    """The running batch's KVCache, whose rows requests take and give back.

    A new request's prompt is prefilled in a cache of its own and copied into a free row (copy_row); the
    rows in use are always the first ones, and one decoding step runs them (first_rows)."""

    def copy_row(self, row, source, source_row=0):
        """Make `row` hold the sequence in row `source_row` of cache `source` (which may be shorter): how a
        sequence prefilled on its own joins a batch, and how a batch closes the gap a finished one leaves.
        Positions past its length keep stale values; attention never sees them."""
        length = int(source.length[source_row])
        for layer in range(len(self.k)):
            if self.k[layer] is None:
                self.k[layer] = source.k[layer].new_zeros(self.shape)
                self.v[layer] = source.v[layer].new_zeros(self.shape)
            self.k[layer][row, :, :length] = source.k[layer][source_row, :, :length]
            self.v[layer][row, :, :length] = source.v[layer][source_row, :, :length]
        self.length[row] = length

    def first_rows(self, n):
        """A cache of the first n rows that shares this one's memory: decoding it updates them here.
        Copy a sequence in first (copy_row): a layer not allocated yet has no rows to share."""
        assert all(k is not None for k in self.k), "first_rows of a cache nothing was copied into"
        rows = copy.copy(self)
        rows.shape = (n,) + self.shape[1:]
        rows.k, rows.v = [k[:n] for k in self.k], [v[:n] for v in self.v]
        rows.length = self.length[:n]
        return rows


@dataclass(eq=False)
class Sequence:
    """One request as the scheduler sees it. The handler reads `events`: ("text", str) any number of
    times, then ("end", finish_reason, usage) or ("error", message). `cancelled` is set by the handler
    when its client went away; the scheduler drops the sequence before its next token."""
    prompt_ids: list
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    stop: list
    generator: torch.Generator | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    ignore_eos: bool = False
    cancelled: bool = False
    generated: int = 0
    output: TextOutput | None = None

    def post(self, *event):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    def usage(self):
        prompt_tokens = len(self.prompt_ids)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": self.generated,
                "total_tokens": prompt_tokens + self.generated}


def sample_tokens(sequences, logits):
    """The next token of each sequence (row of logits). Rows that sample alike (same settings, no seed
    of their own) are sampled in one call; a seeded request draws from its own generator."""
    tokens = [None] * len(sequences)
    groups = {}
    for row, s in enumerate(sequences):
        key = (s.temperature, s.top_k, s.top_p) if s.generator is None else ("seeded", row)
        groups.setdefault(key, []).append(row)
    for rows in groups.values():
        s = sequences[rows[0]]
        picked = sample_next_token(logits[rows], s.temperature, s.top_k, s.top_p, s.generator)
        for row, token in zip(rows, picked.tolist()):
            tokens[row] = token
    return tokens


class Scheduler:
    """Owns the model and decodes the running sequences together, one token each per step.

    Row i of the cache holds self.rows[i], whose next input token is self.next_ids[i]. A sequence comes in
    through submit, takes a row in _admit (unless its first token ends it), gets a token per step and
    leaves through _drop; _finish and _fail tell its handler how it ended."""

    def __init__(self, model, tokenizer, stop_ids, max_batch_size, compile=False, dtype=torch.float32):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, set(stop_ids)
        self.device, self.dtype = next(model.parameters()).device, dtype
        self.max_batch_size = max_batch_size
        self.cache = BatchCache(model.config, max_batch_size, model.config.max_seq_len, self.device)
        self.rows = []          # the sequences in rows 0..len-1 of the cache
        self.next_ids = []      # each row's last token, the input of the next step
        self.waiting = queue.Queue()
        self.finished = {"stop": 0, "length": 0, "cancelled": 0, "error": 0}
        self.decode_step = model.compiled_decode_step() if compile else model.decode
        if compile:
            self._compile_now()

    def submit(self, sequence):
        self.waiting.put(sequence)

    def stats(self):
        return {"running": len(self.rows), "waiting": self.waiting.qsize(), "finished": dict(self.finished)}

    def run(self):
        """The scheduler thread's loop (grad mode and autocast are per thread: they must be set here)."""
        with torch.no_grad(), autocast(self.device, self.dtype):
            while True:
                self.iterate(block=True)

    def iterate(self, block=False):
        """Admit waiting requests into the free rows, then decode one token for every row. block: when no
        row is running, sleep until a request comes."""
        arrived = self._arrivals(block)
        if arrived:
            self._admit(arrived)
        try:
            if self.rows:
                self.step()
        except Exception:  # a bug must not take the server down with it: fail these requests
            self._fail(list(self.rows))

    def _arrivals(self, block):
        """The waiting requests that fit in the free rows (block: wait for one if nothing else would run)."""
        arrived = []
        try:
            while len(self.rows) + len(arrived) < self.max_batch_size:
                arrived.append(self.waiting.get(block=block and not self.rows and not arrived))
        except queue.Empty:
            pass
        return arrived

    # --- admitting requests: a batched prefill -------------------------------------------------

    def _admit(self, sequences):
        """Prefill the new requests' prompts together and give a row to each that does not end at its
        first token. If that fails, each is tried alone, so that one bad request fails on its own."""
        for sequence in [s for s in sequences if s.cancelled]:
            self._finish(sequence, "cancelled")
        sequences = [s for s in sequences if not s.cancelled]
        if not sequences:
            return
        try:
            cache, tokens = self._prefill(sequences)
        except Exception:
            if len(sequences) > 1:
                for sequence in sequences:
                    self._admit([sequence])
            else:
                self._fail(sequences)
            return
        for row, (sequence, token) in enumerate(zip(sequences, tokens)):
            if not self._emit(sequence, token):
                self.cache.copy_row(len(self.rows), cache, row)
                self.rows.append(sequence)
                self.next_ids.append(token)

    def _prefill(self, sequences):
        """Run the prompts in one forward pass (right-padded) into a cache of their own: that cache, and
        each sequence's first token."""
        lengths = [len(s.prompt_ids) for s in sequences]
        prompts = torch.zeros(len(sequences), max(lengths), dtype=torch.long, device=self.device)
        for row, sequence in enumerate(sequences):
            prompts[row, :lengths[row]] = torch.tensor(sequence.prompt_ids)
            sequence.output = TextOutput(self.tokenizer, sequence.stop)
        cache = KVCache(self.model.config, len(sequences), max(lengths), self.device)
        logits = self.model.decode(prompts, cache, torch.tensor(lengths, device=self.device)).float()
        return cache, sample_tokens(sequences, logits)

    # --- one decoding step, and the text each token completes ----------------------------------

    def step(self):
        """One token for every running sequence; those that end, or whose client left, give up their row."""
        self._drop([i for i, s in enumerate(self.rows) if s.cancelled], "cancelled")
        if not self.rows:
            return
        n = len(self.rows)
        input_ids = torch.tensor(self.next_ids, dtype=torch.long, device=self.device)[:, None]
        logits = self.decode_step(input_ids, self.cache.first_rows(n)).float()
        self.next_ids = sample_tokens(self.rows, logits)
        self._drop([i for i, (sequence, token) in enumerate(zip(self.rows, self.next_ids))
                    if self._emit(sequence, token)], None)

    def _emit(self, sequence, token):
        """Send the text `token` completes; True when the sequence has ended (its end event is posted)."""
        sequence.generated += 1
        if token in self.stop_ids and not sequence.ignore_eos:
            self._finish(sequence, "stop")
            return True
        delta, stopped = sequence.output.add(token)
        if delta:
            sequence.post("text", delta)
        if stopped or sequence.generated >= sequence.max_tokens:
            self._finish(sequence, "stop" if stopped else "length")
            return True
        return False

    # --- finishing and dropping rows -----------------------------------------------------------

    def _finish(self, sequence, reason):
        """Count how the sequence ended and tell its handler: the text held back and the end event (stop,
        length) or the error event; a cancelled sequence's handler is gone."""
        self.finished[reason] += 1
        if reason == "error":
            sequence.post("error", "the server failed while generating; see its log")
        elif reason != "cancelled":
            rest = sequence.output.rest()
            if rest:
                sequence.post("text", rest)
            sequence.post("end", reason, sequence.usage())

    def _drop(self, indices, reason):
        """Free these rows; the last row moves into each gap, so the rows in use stay the first ones."""
        for i in sorted(indices, reverse=True):  # every row after i is still running
            if reason:
                self._finish(self.rows[i], reason)
            last = len(self.rows) - 1
            if i != last:
                self.cache.copy_row(i, self.cache, last)
                self.rows[i], self.next_ids[i] = self.rows[last], self.next_ids[last]
            self.rows.pop()
            self.next_ids.pop()

    def _fail(self, sequences):
        """End these sequences with an error (the traceback goes to the log); the others run on."""
        traceback.print_exc()
        for sequence in sequences:
            self._finish(sequence, "error")
        kept = [i for i, s in enumerate(self.rows) if s not in sequences]
        self.rows, self.next_ids = [self.rows[i] for i in kept], [self.next_ids[i] for i in kept]

    def _compile_now(self):
        """Compile the decoding step before the first request: for one row, then for two (from then on
        the batch size is symbolic and 2..max_batch_size rows reuse it)."""
        print("compiling the decoding step...", file=sys.stderr)
        scratch = BatchCache(self.model.config, 2, self.model.config.max_seq_len, self.device)
        with torch.no_grad(), autocast(self.device, self.dtype):  # compiled for the dtype it will run in
            self.model.decode(torch.zeros(2, 1, dtype=torch.long, device=self.device), scratch)
            for n in (1, 2):
                self.decode_step(torch.zeros(n, 1, dtype=torch.long, device=self.device), scratch.first_rows(n))
