"""Serve a model over an OpenAI-compatible HTTP API, with continuous batching and a web chat page.

    python serve.py --model runs/demo/sft                  then open http://127.0.0.1:8000/
    python serve.py --model sft_model --api_key KEY --max_batch_size 16 --compile

Endpoints (the subset of OpenAI's API that the official `openai` client needs for text):
    GET  /v1/models             the one model served, named after its directory
    POST /v1/chat/completions   messages -> the assistant's answer (stream: server-sent events)
    POST /v1/completions        prompt -> its continuation
    GET  /                      the chat page (static/chat.html)
    GET  /health                200 while the server runs, with the scheduler's counters

How it works. One scheduler thread owns the model; the HTTP handlers (FastAPI on uvicorn, asyncio)
validate and tokenize a request, put it on the scheduler's queue and read its text back from an asyncio
queue. Between two decoding steps the scheduler takes the requests that came meanwhile: it runs their
prompts together (right-padded, one forward pass) into a cache of their own, samples each first token and
copies each prompt's keys and values into a free row of the batch's KVCache. Then one forward pass decodes
every row, each sequence at its own position: continuous batching, as vLLM and TGI do it. Rows that
sample alike are sampled in one call (a short answer is a few tokens: per-row work adds up). A request
never waits for another to finish, only for a free row when --max_batch_size rows are taken. A finished
or abandoned request frees its row at once (the last row moves into the gap, so the rows in use are
always the first ones).

Trade-offs: each row reserves max_seq_len positions up front (no paged memory: simple, and small models
have short contexts); a long prompt's prefill delays the running rows by one forward pass (no chunked
prefill); one process, one device.
"""
import argparse
import asyncio
import copy
import io
import json
import os
import queue
import re
import secrets
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Literal

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from generate import TextStreamer, load, stop_ids
from hardware import add_dtype_argument, autocast, choose_dtype, warn_if_emulated
from model import KVCache, sample_next_token
from tools import BUILT_IN, parse_tool_calls, run_tool, tool_schemas

CHAT_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "chat.html")
MAX_STOP_STRINGS = 4  # as OpenAI

# A request's way through this file: chat_prompt_ids or completion_prompt_ids (the request -> prompt ids),
# answer_max_tokens and sequence_for (-> the scheduler's Sequence), Scheduler (tokens -> text events, each
# answer's text cut at its stop strings by TextOutput), respond (events -> one JSON object, whole_response,
# or server-sent events, event_stream), with ChatAnswer or CompletionAnswer putting the generated text into
# the endpoint's shapes. Errors of every kind are APIErrors, answered as OpenAI does.


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


# --- the HTTP API: requests and errors ---------------------------------------------------------

class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, code=None, type="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self):
        return JSONResponse(self.body(), status_code=self.status)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON, as OpenAI sends it


class ToolCall(BaseModel):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # the call a tool message answers

    def text(self):
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def for_template(self):
        """The message as the chat template reads it (the calls' arguments parsed: they must be JSON)."""
        message = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            calls = []
            for call in self.tool_calls:
                try:
                    arguments = json.loads(call.function.arguments)
                except json.JSONDecodeError:
                    raise APIError(400, f"The arguments of the call to {call.function.name} are not JSON.",
                                   "messages")
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments}})
            message["tool_calls"] = calls
        return message


class FunctionSpec(BaseModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionCall | dict


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields both endpoints share; others that OpenAI knows (penalties, logprobs...) are ignored."""
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # 0: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's; vLLM's and llama.cpp's extra field. 0: off
    ignore_eos: bool = False  # vLLM's extra field: answers run to max_tokens (fixed-length benchmarks)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, lt=2**64)  # what torch.Generator takes
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1)  # one choice per request

    def stop_strings(self):
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
            raise APIError(400, f"'stop' takes up to {MAX_STOP_STRINGS} non-empty strings", "stop")
        return stop


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None

    def offered_tools(self):
        """The schemas the model sees ([] with tool_choice "none"), and the name a named tool_choice forces."""
        if not self.tools or self.tool_choice == "none":
            return [], None
        schemas = [tool.model_dump(exclude_none=True) for tool in self.tools]
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function["name"] if isinstance(self.tool_choice.function, dict) \
                else self.tool_choice.function.name
            if name not in {tool.function.name for tool in self.tools}:
                raise APIError(400, f"tool_choice names {name!r}, which is not among 'tools'.", "tool_choice")
            return schemas, name
        return schemas, None


class CompletionRequest(SamplingRequest):
    prompt: str | list[int]


def validation_error(exc):
    """A FastAPI/pydantic validation error as an OpenAI error: the first problem, named by its field."""
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request: it is not valid JSON.")
    if tuple(first["loc"]) == ("body",):
        return APIError(400, f"The body of your request must be a JSON object ({first['msg']}).")
    # loc: ("body", field, index, ...), and for a union the member tried last ("str", "list[int]"): dropped.
    where = [str(part) for part in first["loc"][1:]
             if not re.fullmatch(r"str|int|float|bool|(list|dict)\[.*\]", str(part))]
    param = ".".join(where) or None
    return APIError(400, f"Invalid '{param}': {first['msg']}" if param else first["msg"], param)


def add_error_handlers(app):
    """Every error, the app's own, a request FastAPI refuses or a bug, answered in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def api_error(request, exc):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc):
        return validation_error(exc).response()

    @app.exception_handler(Exception)
    async def server_error(request, exc):  # a bug: still an answer in OpenAI's shape (the log has the traceback)
        traceback.print_exception(exc)
        return APIError(500, "the server failed on this request; see its log", type="server_error").response()

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return APIError(exc.status_code, str(exc.detail)).response()


def key_check(api_key):
    """The dependency that refuses a request without 'Authorization: Bearer api_key' (none: all pass)."""

    def check_key(request: Request):
        if api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided." if given else
                           "You didn't provide an API key: send it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")
    return check_key


# --- a request -> prompt ids and the scheduler's Sequence --------------------------------------

def chat_prompt_ids(tokenizer, body):
    """(prompt ids, forced start of the answer): the conversation in the model's chat template, with the
    request's tools, ending where the assistant's answer starts. tool_choice "required" or a named tool
    makes the answer start as a call (to that tool): the template's call opening is appended to the prompt
    and is the start of the answer, which ChatAnswer reads back."""
    schemas, named = body.offered_tools()
    if schemas and "tools" not in (tokenizer.chat_template or ""):
        raise APIError(400, "This model's chat template renders no tools (a tokenizer written before tool "
                            "calling).", "tools")
    messages = [m.for_template() for m in body.messages]
    prompt = tokenizer.apply_chat_template(messages, tools=schemas or None, add_generation_prompt=True,
                                           tokenize=False)
    forced = ""
    if named is not None:
        forced = f'<tool_call>\n{{"name": "{named}", "arguments": '
    elif body.tool_choice == "required":
        forced = '<tool_call>\n{"name": "'
    return tokenizer(prompt + forced, add_special_tokens=False)["input_ids"], forced


def completion_prompt_ids(tokenizer, body):
    """The prompt's token ids: its text tokenized as it is (no special tokens added), or the ids given."""
    if isinstance(body.prompt, str):
        prompt_ids = tokenizer(body.prompt, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = body.prompt
        if any(not 0 <= t < len(tokenizer) for t in prompt_ids):
            raise APIError(400, f"'prompt': token ids must be in [0, {len(tokenizer)})", "prompt")
    if not prompt_ids:
        raise APIError(400, "'prompt' is empty", "prompt")
    return prompt_ids


def answer_max_tokens(body, prompt_length, max_seq_len, default, prompt_param):
    """How many tokens the answer may have: the request's max_tokens, else `default` or what room the
    context leaves. A prompt and answer longer than the context: error 400, naming prompt_param or
    max_tokens."""
    room = max_seq_len - prompt_length
    too_long = f"This model's maximum context length is {max_seq_len} tokens, and the prompt has {prompt_length}"
    if room < 1:
        raise APIError(400, f"{too_long}: no room is left for an answer. Please shorten the prompt.",
                       prompt_param, "context_length_exceeded")
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or min(default, room)
    if max_tokens > room:
        raise APIError(400, f"{too_long}: at most {room} tokens are left for the answer, not {max_tokens}. "
                            f"Please reduce max_tokens or the prompt.", "max_tokens", "context_length_exceeded")
    return max_tokens


def sequence_for(body, prompt_ids, max_tokens, device):
    """The scheduler's Sequence for a request, its events read in the running event loop."""
    generator = None
    if body.seed is not None:
        generator = torch.Generator(device).manual_seed(body.seed)
    temperature = 1.0 if body.temperature is None else body.temperature  # OpenAI's default
    return Sequence(prompt_ids, max_tokens, temperature, body.top_k or None, body.top_p, body.stop_strings(),
                    generator, asyncio.get_running_loop(), ignore_eos=body.ignore_eos)


# --- the generated text -> the response --------------------------------------------------------

def choice(fields, finish_reason):
    return {"index": 0, **fields, "finish_reason": finish_reason, "logprobs": None}


class ChatAnswer:
    """The generated text as chat.completion's choices: the assistant's message (whole), or the deltas
    that make it up (stream: opening, piece and closing give the choices to send, a chunk each).

    With tools, the text may hold calls (<tool_call>{json}</tool_call>): the message then has tool_calls
    (ids, name, arguments as a JSON string) and the finish reason is "tool_calls". Streamed, the text from
    a possible call's first "<" on is held back until the answer ends, then sent as tool-call deltas. A call
    the model writes badly (not JSON, a tool not offered) comes back as plain content."""
    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, tool_names=(), forced=""):
        self.tool_names, self.held, self.sent = set(tool_names), forced, False

    def whole(self, text, finish_reason):
        content, calls = self.calls_of(self.held + text)
        message = {"role": "assistant", "content": content if not calls else (content or None)}
        if calls:
            message["tool_calls"] = calls
        return choice({"message": message}, "tool_calls" if calls else finish_reason)

    def opening(self):  # the role, before any text
        return [choice({"delta": {"role": "assistant", "content": ""}}, None)]

    def piece(self, text):
        if not self.tool_names:
            return [choice({"delta": {"content": text}}, None)]
        text, self.held = hold_back(self.held + text)
        return [choice({"delta": {"content": text}}, None)] if text else []

    def closing(self, finish_reason):
        content, calls = self.calls_of(self.held)
        pieces = [choice({"delta": {"content": content}}, None)] if content else []
        for index, call in enumerate(calls):
            pieces.append(choice({"delta": {"tool_calls": [{"index": index, **call}]}}, None))
        return pieces + [choice({"delta": {}}, "tool_calls" if calls else finish_reason)]

    def calls_of(self, text):
        """(content, OpenAI tool_calls) of a text; a malformed call keeps the whole text as content."""
        if not self.tool_names:
            return text, []
        content, calls, malformed = parse_tool_calls(text, self.tool_names)
        if malformed or not calls:
            return text, []
        return content, [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                         for c in calls]


def hold_back(text, opening="<tool_call>"):
    """(what may be sent now, what is held): the text up to a call's opening, or up to an end that could
    be the start of one."""
    start = text.find(opening)
    if start < 0:
        start = next((i for i in range(max(0, len(text) - len(opening) + 1), len(text))
                      if opening.startswith(text[i:])), len(text))
    return text[:start], text[start:]


class CompletionAnswer:
    """The generated text as text_completion's choices, whole or (stream) piece by piece."""
    object = chunk_object = "text_completion"
    id_prefix = "cmpl"

    def whole(self, text, finish_reason):
        return choice({"text": text}, finish_reason)

    def opening(self):
        return []

    def piece(self, text):
        return [choice({"text": text}, None)]

    def closing(self, finish_reason):
        return [choice({"text": ""}, finish_reason)]


async def sequence_events(scheduler, sequence):
    """The sequence's events until its end; if the client goes away first, its row is freed."""
    scheduler.submit(sequence)
    try:
        while True:
            event = await sequence.events.get()
            yield event
            if event[0] != "text":
                return
    finally:
        sequence.cancelled = True  # read by the scheduler; a no-op once the sequence has ended


async def respond(scheduler, sequence, body, answer, model_name):
    """The whole answer as one JSON object, or (stream) server-sent events, in OpenAI's formats."""
    head = {"id": f"{answer.id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
    events = sequence_events(scheduler, sequence)
    if not body.stream:
        return await whole_response(events, answer, head)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return StreamingResponse(event_stream(events, answer, head, include_usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def whole_response(events, answer, head):
    """The JSON object of a non-streamed answer, once it has ended; its failure: error 500."""
    parts = []
    async for event in events:
        if event[0] == "text":
            parts.append(event[1])
        elif event[0] == "error":
            raise APIError(500, event[1], type="server_error")
        else:
            return {**head, "object": answer.object, "choices": [answer.whole("".join(parts), event[1])],
                    "usage": event[2]}


def sse(payload):
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def event_stream(events, answer, head, include_usage):
    """A streamed answer's server-sent events: a chunk per piece of text, the finish reason, the usage if
    asked, then [DONE]. A failure mid-stream is an error event (the status, 200, is sent already)."""

    def chunk(choices, **extra):
        return sse({**head, "object": answer.chunk_object, "choices": choices, **extra})

    for opening in answer.opening():
        yield chunk([opening])
    async for event in events:
        if event[0] == "text":
            for piece in answer.piece(event[1]):
                yield chunk([piece])
        elif event[0] == "error":
            yield sse(APIError(500, event[1], type="server_error").body())
        else:
            for closing in answer.closing(event[1]):
                yield chunk([closing])
            if include_usage:
                yield chunk([], usage=event[2])
    yield "data: [DONE]\n\n"


# --- the app -----------------------------------------------------------------------------------

def create_app(scheduler, tokenizer, model_name, max_seq_len, api_key=None, built_in_tools=()):
    """The FastAPI app. `tokenizer` encodes prompts in the event loop: it must not be the scheduler's,
    which decodes at the same time in its own thread (a Rust tokenizer object is not to be shared).
    built_in_tools: the names of tools.py's tools that /tools offers and runs (the chat page's)."""
    app = FastAPI(title="Tiny-LLM", docs_url=None, redoc_url=None)
    add_error_handlers(app)
    with_key = [Depends(key_check(api_key))]
    model_card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "tiny-llm",
                  "max_model_len": max_seq_len}

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(CHAT_PAGE, media_type="text/html")

    @app.get("/health")
    async def health():
        return {"status": "ok", **scheduler.stats()}

    @app.get("/v1/models", dependencies=with_key)
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{name:path}", dependencies=with_key)
    async def model(name: str):
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server has '{model_name}'.", "model",
                           "model_not_found")
        return model_card

    @app.post("/v1/chat/completions", dependencies=with_key)
    async def chat_completions(body: ChatRequest):
        prompt_ids, forced = chat_prompt_ids(tokenizer, body)
        # Without max_tokens, an answer may fill the rest of the context (OpenAI's default).
        max_tokens = answer_max_tokens(body, len(prompt_ids), max_seq_len, max_seq_len, "messages")
        sequence = sequence_for(body, prompt_ids, max_tokens, scheduler.device)
        names = [tool["function"]["name"] for tool in body.offered_tools()[0]]
        return await respond(scheduler, sequence, body, ChatAnswer(names, forced), model_name)

    @app.get("/tools")
    async def tools():
        """The built-in tools this server runs (--tools), for the chat page to offer its model."""
        return {"tools": tool_schemas(built_in_tools)}

    @app.post("/tools/{name}")
    async def run(name: str, request: Request):
        """Run a built-in tool of --tools on the JSON arguments of the body: {"content": result}."""
        if name not in built_in_tools:
            raise APIError(404, f"This server runs no tool {name!r}.", "name")
        try:
            arguments = await request.json()
        except json.JSONDecodeError:
            raise APIError(400, "The arguments are not JSON.")
        if not isinstance(arguments, dict):
            raise APIError(400, "The arguments must be a JSON object.")
        return {"content": await asyncio.to_thread(run_tool, name, arguments)}

    @app.post("/v1/completions", dependencies=with_key)
    async def completions(body: CompletionRequest):
        prompt_ids = completion_prompt_ids(tokenizer, body)
        max_tokens = answer_max_tokens(body, len(prompt_ids), max_seq_len, 16, "prompt")  # OpenAI's 16
        sequence = sequence_for(body, prompt_ids, max_tokens, scheduler.device)
        return await respond(scheduler, sequence, body, CompletionAnswer(), model_name)

    return app


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory written by train_model.py")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--api_key", default=None, help="clients must send 'Authorization: Bearer KEY'")
    p.add_argument("--max_batch_size", type=int, default=8, help="sequences decoded together at most")
    add_dtype_argument(p, "decode")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoding step (compiled at start-up, before the first request)")
    p.add_argument("--tools", default="", metavar="NAMES",
                   help=f"built-in tools the chat page offers the model and /tools runs ({', '.join(BUILT_IN)})")
    return p.parse_args(argv)


def main(argv=None):
    import uvicorn
    from transformers import AutoTokenizer
    args = parse_args(argv)
    if args.max_batch_size < 1:
        sys.exit(f"error: --max_batch_size must be at least 1, not {args.max_batch_size}")
    built_in_tools = [name for name in args.tools.split(",") if name]
    unknown = [name for name in built_in_tools if name not in BUILT_IN]
    if unknown:
        sys.exit(f"error: --tools: no built-in tool {', '.join(unknown)}; there is {', '.join(BUILT_IN)}")
    model, scheduler_tokenizer = load(args.model, args.device)
    dtype, _ = choose_dtype(next(model.parameters()).device, args.dtype, job="decode")
    warn_if_emulated(next(model.parameters()).device, dtype)
    scheduler = Scheduler(model, scheduler_tokenizer, stop_ids(args.model, scheduler_tokenizer),
                          args.max_batch_size, compile=args.compile, dtype=dtype)
    threading.Thread(target=scheduler.run, name="scheduler", daemon=True).start()
    model_name = os.path.basename(os.path.normpath(args.model))
    app = create_app(scheduler, AutoTokenizer.from_pretrained(args.model), model_name, model.config.max_seq_len,
                     args.api_key, built_in_tools)
    print(f"serving {model_name} ({model.num_params() / 1e6:.2f}M parameters, {model.config.max_seq_len} "
          f"tokens of context) on http://{args.host}:{args.port}/ ; OpenAI API at "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
