"""Streaming datasets for pretraining (packed blocks), SFT (chat-template conversations) and DPO (pairs of
answers to one prompt, the chosen and the rejected).

Both read a corpus of one or many files (`data_files`: files, directories, glob patterns, read in sorted
path order): JSONL (`.jsonl`, `.jsonl.gz`) line by line and Parquet row group by row group, so a corpus
of any size trains in bounded memory. Rows are numbered across the files as if they were one file, and
every `val_every`-th row (200th by default) of the corpus is the validation split: the split, like the
training blocks, is the same however the corpus is cut into shards.

Samples have a global order that does not depend on the number of processes: sample i goes to rank
i % world_size, and inside a rank whole batches go round-robin to the DataLoader workers. So N ranks with
batch b see, per step, the same samples as one process with batch N*b, and a run resumes anywhere by
skipping the samples it already trained on (`start_sample`). One exception, so that N ranks do not each
tokenize the whole corpus: streaming pretraining on N ranks, where each rank packs its own share of the
rows (see PretrainDataset); the token cache keeps the global order.
"""
import collections
import glob
import gzip
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import time

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

PROBE_LINES = 2000  # lines read before training to check the file and estimate its length
RANK_ROWS = 64  # streaming pretraining on N ranks: rows i..i+63 of the corpus go to one rank, in turn
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


class DataError(Exception):
    """Input that cannot be trained on; the message names the file (and line) and is shown as is."""


class BadLine(ValueError):
    """One line that is skipped (or, with --strict, stops the run)."""


def parse_text(record):
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise BadLine("no non-empty string field 'text'")
    return text


def parse_conversation(record):
    """Messages as [{"role", "content"}] from `messages` (role/content) or BelleGroup `conversations`."""
    if isinstance(record.get("messages"), list):
        turns, role_key, content_key = record["messages"], "role", "content"
    elif isinstance(record.get("conversations"), list):
        turns, role_key, content_key = record["conversations"], "from", "value"
    else:
        raise BadLine("no list field 'messages' or 'conversations'")
    messages = parse_turns(turns, role_key, content_key)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadLine("no assistant turn")
    return messages


def parse_turns(turns, role_key="role", content_key="content"):
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadLine("a turn is not an object")
        role, content = turn.get(role_key), turn.get(content_key)
        if role not in ROLES:
            raise BadLine(f"unknown role {role!r}")
        if not isinstance(content, str):
            raise BadLine(f"{content_key} of a {role} turn is not a string")
        messages.append({"role": ROLES[role], "content": content})
    return messages


def parse_preference(record):
    """(prompt, chosen, rejected) as message lists from {"prompt": [messages], "chosen": [assistant
    message(s)], "rejected": [...]}, or from the flat form with strings: a user turn and an answer."""
    parts = []
    for key in ("prompt", "chosen", "rejected"):
        value = record.get(key)
        if isinstance(value, str):
            if not value.strip():
                raise BadLine(f"'{key}' is empty")
            parts.append([{"role": "user" if key == "prompt" else "assistant", "content": value}])
        elif isinstance(value, list) and value:
            parts.append(parse_turns(value))
        else:
            raise BadLine(f"no field '{key}' (a string or a non-empty list of messages)")
    prompt, chosen, rejected = parts
    if prompt[-1]["role"] == "assistant":
        raise BadLine("the prompt ends with an assistant turn; the answers are the assistant's")
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if any(m["role"] != "assistant" for m in answer):
            raise BadLine(f"'{key}' holds a turn that is not the assistant's")
    if chosen == rejected:
        raise BadLine("'chosen' and 'rejected' are the same")
    return prompt, chosen, rejected


def parse_texts(record):
    """Every text in a pretraining or SFT record (for tokenizer training)."""
    if "text" in record:
        return [parse_text(record)]
    return [m["content"] for m in parse_conversation(record)]


DATA_EXTENSIONS = (".jsonl", ".jsonl.gz", ".parquet")
PARQUET_COLUMNS = ("text", "messages", "conversations")  # the fields the parsers read


def data_files(data_path):
    """The files of --data_path, sorted by path, each once: `data_path` is a path or a list of them, each
    a file, a directory (its .jsonl, .jsonl.gz and .parquet files, in subdirectories too) or a glob
    pattern. Files given by name or pattern are read whatever their extension (as JSONL unless .parquet)."""
    files = set()
    for spec in [data_path] if isinstance(data_path, str) else data_path:
        if os.path.isdir(spec):
            found = [os.path.join(root, name) for root, _, names in os.walk(spec) for name in names
                     if name.endswith(DATA_EXTENSIONS)]
            if not found:
                raise DataError(f"{spec}: the directory holds no .jsonl, .jsonl.gz or .parquet file")
        elif os.path.isfile(spec):
            found = [spec]
        else:
            found = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
            if not found:
                raise DataError(f"data path {spec}: no file matches the pattern" if glob.has_magic(spec)
                                else f"data file {spec} does not exist; pass --data_path")
        files.update(os.path.normpath(p) for p in found)
    return sorted(files)


def open_binary(path):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def is_parquet(path):
    return path.endswith(".parquet")


def text_bytes(path, sample=64 << 20):
    """Uncompressed size of a data file; for .gz, extrapolated from the first `sample` bytes' ratio; for
    Parquet, the uncompressed size of its columns."""
    if is_parquet(path):
        import pyarrow.parquet as pq
        metadata = pq.ParquetFile(path).metadata
        return sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    if not path.endswith(".gz"):
        return os.path.getsize(path)
    with gzip.open(path, "rb") as f:
        uncompressed = 0
        while uncompressed < sample:
            chunk = f.read(1 << 20)
            if not chunk:
                return uncompressed  # read to the end: exact
            uncompressed += len(chunk)
        compressed_read = f.fileobj.tell()
    return int(uncompressed * os.path.getsize(path) / compressed_read)


def read_rows(path):
    """(row_number, raw) for each row of a file, numbered from 1: raw is a JSONL line's bytes (None for
    a blank line, which is numbered but holds nothing) or a Parquet row as a dict. Parquet files are read
    one row group at a time, and only the columns the parsers use."""
    if not is_parquet(path):
        with open_binary(path) as f:
            for row, line in enumerate(f, 1):
                yield row, line if line.strip() else None
        return
    import pyarrow.parquet as pq
    parquet = pq.ParquetFile(path)
    columns = [name for name in PARQUET_COLUMNS if name in parquet.schema_arrow.names]
    row = 0
    for group in range(parquet.num_row_groups):
        for record in parquet.read_row_group(group, columns=columns).to_pylist():
            row += 1
            yield row, record


def corpus_rows(files, max_rows=None):
    """(index, path, row, raw) for each row of the files in order; index counts the rows of all the
    files from 1, blank lines included, so a corpus split into shards numbers its rows as one file."""
    index = 0
    for path in files:
        for row, raw in read_rows(path):
            index += 1
            if max_rows is not None and index > max_rows:
                return
            yield index, path, row, raw


def parse_row(raw, parse):
    """parse(record) of a JSONL line or Parquet row; BadLine names what is wrong with it."""
    if isinstance(raw, bytes):
        try:
            raw = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise BadLine("invalid UTF-8")
        except json.JSONDecodeError as e:
            raise BadLine(f"invalid JSON ({e.msg})")
        if not isinstance(raw, dict):
            raise BadLine("not a JSON object")
    return parse(raw)


class BadRows:
    """The bad rows met so far, and the rules on them: stop on the first with `strict`, stop when more
    than `max_bad_fraction` of the rows read are bad (checked from 1000 rows on, and at the end)."""

    def __init__(self, files, strict=False, max_bad_fraction=0.01):
        self.many = len(files) > 1
        self.where = f"{len(files)} files ({files[0]} ... {files[-1]})" if self.many else files[0]
        self.strict, self.max_bad_fraction = strict, max_bad_fraction
        self.seen, self.bad = 0, []  # bad: (index, path, row, reason)

    def add(self, index, path, row, reason):
        if self.strict:
            raise DataError(f"{path}:{row}: {reason} (--strict stops at the first bad line)")
        self.bad.append((index, path, row, reason))
        if self.seen >= 1000 and len(self.bad) > self.max_bad_fraction * self.seen:
            raise DataError(self._too_many())

    def finish(self, nonblank, report_after=0):
        """The checks at the end of a pass; one warning for the bad rows after row `report_after`
        (None: no warning)."""
        if nonblank == 0:
            raise DataError(f"{self.where}: the {'files are' if self.many else 'file is'} empty")
        if self.seen and self.seen == len(self.bad):
            raise DataError(f"{self.where}: no valid sample ({positions(self.bad)})")
        if len(self.bad) > self.max_bad_fraction * self.seen:
            raise DataError(self._too_many())
        reported = [b for b in self.bad if report_after is not None and b[0] > report_after]
        if reported:
            after = f" after its first {report_after} lines" if report_after else ""
            print(f"warning: skipped {len(reported)} bad line(s) in {self.where}{after}: {positions(reported)}",
                  file=sys.stderr)

    def _too_many(self):
        return (f"{self.where}: {len(self.bad)} of the first {self.seen} lines are bad, more than "
                f"--max_bad_fraction {self.max_bad_fraction} ({positions(self.bad)})")


def positions(bad):
    shown = "; ".join(f"{path}:{row}: {reason}" for _, path, row, reason in bad[:3])
    return shown + (" ..." if len(bad) > 3 else "")


def read_records(data_path, parse, keep=None, strict=False, max_bad_fraction=0.01, report_after=0,
                 max_lines=None):
    """Yield (index, parse(record)) for each good row of the corpus (see `data_files`), in order.

    A bad row (invalid UTF-8 or JSON, or rejected by `parse` with BadLine) is skipped and counted; at the
    end one warning gives the count and the first positions (file:row) of those after row `report_after`
    (None: no warning). It stops with DataError on the first bad row when `strict`, when bad rows exceed
    `max_bad_fraction`, or when no row is good. `keep(index)` selects rows (by their index in the whole
    corpus, see `corpus_rows`) before they are parsed; `max_lines` stops early.
    """
    files = data_files(data_path)
    bad_rows, nonblank = BadRows(files, strict, max_bad_fraction), 0
    for index, path, row, raw in corpus_rows(files, max_lines):
        if raw is None:
            continue
        nonblank += 1
        if keep is not None and not keep(index):
            continue
        bad_rows.seen += 1
        try:
            value = parse_row(raw, parse)
        except BadLine as e:
            bad_rows.add(index, path, row, str(e))
        else:
            yield index, value
    bad_rows.finish(nonblank, report_after)


class JsonlDataset(IterableDataset):
    """The shared machinery: passes over the corpus, the train/validation split, sharding and skipping.

    Every `val_every`-th row of the corpus is held out for validation. Subclasses define `_items(epoch)`,
    the items of one pass in global order (the same on every rank: it depends only on the data, `seed` and
    `epoch`), and `_encode(item)`, the sample dict, run only for the items this process owns.
    """

    def __init__(self, data_path, tokenizer, max_length, *, split="train", epochs=1, rank=0,
                 world_size=1, batch_size=1, start_sample=0, strict=False, max_bad_fraction=0.01,
                 val_every=200, seed=0):
        assert split in ("train", "val"), split
        self.data_path, self.tokenizer, self.max_length = data_path, tokenizer, max_length
        self.split, self.epochs, self.val_every = split, epochs, val_every
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.start_sample, self.strict, self.max_bad_fraction = start_sample, strict, max_bad_fraction
        self.seed = seed
        self._first_pass = True
        # False: the items are one global stream, of which this rank takes every world_size-th. True: the
        # rank reads only its own rows of the corpus (see RANK_ROWS) and every item of them is its own.
        self.rank_stream = False

    def _keep_line(self, line_number):
        held_out = line_number % self.val_every == 0
        if self.rank_stream and (line_number - 1) // RANK_ROWS % self.world_size != self.rank:
            return False
        return held_out if self.split == "val" else not held_out

    def records(self):
        """Good lines of this split. Bad lines of the first PROBE_LINES were reported by
        `estimate_samples_per_epoch`; the rest are reported once, by one process, after the first pass.
        Validation lines are too few for a meaningful share, so only the training split can stop on it."""
        info = get_worker_info()
        reporter = self.rank == 0 and (info is None or info.id == 0)
        training = self.split == "train"
        return read_records(self.data_path, self.parse, keep=self._keep_line, strict=self.strict,
                            max_bad_fraction=self.max_bad_fraction if training else 1.0,
                            report_after=PROBE_LINES if training and reporter and self._first_pass else None)

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # start_sample counts the samples of all ranks; in a stream of its own, a rank trained 1/N of them.
        ranks, rank = (1, 0) if self.rank_stream else (self.world_size, self.rank)
        start = self.start_sample // self.world_size if self.rank_stream else self.start_sample
        index = 0  # sample index in the stream, counted across epochs
        for epoch in range(self.epochs):
            self._first_pass = epoch == 0
            for item in self._items(epoch):
                relative = index - start
                index += 1
                if relative < 0 or relative % ranks != rank:
                    continue
                local_batch = (relative // ranks) // self.batch_size
                if local_batch % num_workers == worker:
                    yield self._encode(item)


class PretrainDataset(JsonlDataset):
    """Documents joined by <|endoftext|> and cut into full blocks of max_length tokens: no padding.

    The training split's blocks are shuffled in windows of `window_batches` global batches, with a seed of
    (seed, epoch, window): a second epoch does not replay the first in the same order, and the order is
    still global (the same on every rank) and known in advance (a resumed run skips exactly). A stream can
    only be shuffled within a window it holds; one window of the 215M recipe (64 x 256 blocks of 512) is
    67 MB. Validation blocks stay in file order.

    With `token_cache` (a file made by `build_token_cache`) the training split's token stream is read
    from disk with numpy.memmap instead of being tokenized again: the same blocks in the same order.

    Streaming (no token cache) on N ranks, each rank tokenizes only its own rows (runs of RANK_ROWS rows
    in turn) and packs and shuffles its own blocks: 1/N of the tokenizing work, but not the blocks of one
    process with the global batch (blocks span documents, so which blocks exist depends on what is packed
    together). The exact equivalence of N ranks x batch b with 1 process x batch N*b, and a resume on
    another number of ranks that continues exactly, hold with the token cache (and for SFT, whose samples
    are whole conversations).
    """

    parse = staticmethod(parse_text)

    def __init__(self, data_path, tokenizer, max_length, token_cache=None, window_batches=64, **kwargs):
        super().__init__(data_path, tokenizer, max_length, **kwargs)
        self.rank_stream = self.split == "train" and token_cache is None and self.world_size > 1
        self.window = window_batches * self.batch_size * (1 if self.rank_stream else self.world_size)
        self.end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        assert self.end_of_text is not None, "the tokenizer has no <|endoftext|> token"
        assert token_cache is None or self.split == "train", "the token cache holds the training split"
        self.token_cache = token_cache

    def _documents(self, chunk_lines=1024):
        """Token arrays of the documents, each ending with <|endoftext|>, tokenized in batches."""
        chunk = []
        records = self.records()
        for _, text in records:
            chunk.append(text)
            if len(chunk) == chunk_lines:
                yield from self._tokenize(chunk)
                chunk = []
        yield from self._tokenize(chunk)

    def _tokenize(self, texts):
        return tokenize_documents(self.tokenizer, texts, self.end_of_text)

    def _items(self, epoch):
        if self.split == "val":
            yield from self._blocks()
            return
        for index, window in enumerate(windows(self._blocks(), self.window)):
            seed = [self.seed, epoch, index] + ([self.rank] if self.rank_stream else [])
            for i in np.random.default_rng(seed).permutation(len(window)):
                yield window[i]

    def _blocks(self):
        """The blocks in file order."""
        if self.token_cache is not None:
            stream = np.memmap(self.token_cache, dtype=cache_dtype(self.tokenizer), mode="r")
            full = len(stream) // self.max_length * self.max_length
            yield from (block.astype(np.int64) for block in stream[:full].reshape(-1, self.max_length))
            return
        pending, pending_len = [], 0
        for doc in self._documents():
            pending.append(doc)
            pending_len += len(doc)
            if pending_len >= self.max_length:
                stream = np.concatenate(pending)
                full = len(stream) // self.max_length * self.max_length
                yield from stream[:full].reshape(-1, self.max_length)
                pending, pending_len = [stream[full:]], len(stream) - full

    def _encode(self, block):
        ids = torch.from_numpy(block.copy())
        return {"input_ids": ids, "labels": ids}


class ChatDataset(JsonlDataset):
    """Records rendered through the tokenizer's chat template (SFT, DPO), mixed in windows of
    `window_batches` global batches."""

    def __init__(self, data_path, tokenizer, max_length, window_batches=64, **kwargs):
        super().__init__(data_path, tokenizer, max_length, **kwargs)
        self.window = window_batches * self.batch_size * self.world_size
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')}: has no chat template; "
                            "SFT and DPO need one (train it with tokenizer.py)")


class SFTDataset(ChatDataset):
    """Conversations rendered with the tokenizer's chat template; loss only on what the assistant says.

    The template's {% generation %} block marks each assistant turn's content and its <|im_end|>, so the
    model learns to end its answers. Conversations are sorted by length inside windows of 64 global
    batches, so a padded batch holds similar lengths, and the window's batches are then trained in a
    random order: trained short to long, each window would end on a run of the longest answers (long
    poems, some cut off before their <|im_end|>), and where the run stops would decide whether the model
    ends its answers. The order depends only on the file, the seed and the epoch, so it is global.
    """

    parse = staticmethod(parse_conversation)

    def _items(self, epoch):
        conversations = (messages for _, messages in self.records())
        for index, window in enumerate(windows(conversations, self.window)):
            yield from self._length_sorted_batches(window, [self.seed, epoch, index])

    def _length_sorted_batches(self, window, seed):
        """The window's conversations sorted by length, as global batches in random order; a last,
        partial batch stays last, so that every other batch stays whole."""
        window = sorted(window, key=conversation_length)
        size = self.batch_size * self.world_size
        full = len(window) // size
        for batch in np.random.default_rng(seed).permutation(full):
            yield from window[batch * size:(batch + 1) * size]
        yield from window[full * size:]

    def _encode(self, messages):
        return encode_conversation(self.tokenizer, messages, self.max_length)


class PreferenceDataset(ChatDataset):
    """Preference pairs for DPO: the prompt followed by the chosen answer, and by the rejected one, each
    labelled (for the loss) on the answer's assistant tokens only, not on assistant turns of the prompt.
    The training split's pairs are shuffled in windows of 64 global batches, as pretraining's blocks."""

    parse = staticmethod(parse_preference)

    def _items(self, epoch):
        pairs = (pair for _, pair in self.records())
        if self.split == "val":
            yield from pairs
            return
        for index, window in enumerate(windows(pairs, self.window)):
            for i in np.random.default_rng([self.seed, epoch, index]).permutation(len(window)):
                yield window[i]

    def _encode(self, pair):
        prompt, chosen, rejected = pair
        prompt_length = len(self.tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True)["input_ids"])
        sample = {}
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            encoded = encode_conversation(self.tokenizer, prompt + answer, self.max_length)
            encoded["labels"][:prompt_length] = -100
            sample[name] = encoded
        return sample


def collate_preferences(pairs, pad_id):
    """One batch of 2n rows: the n chosen sequences, then the n rejected ones (one forward for both)."""
    return collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)


def windows(items, size):
    """Consecutive lists of `size` items; the last one may be shorter."""
    window = []
    for item in items:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def cache_dtype(tokenizer):
    return np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32


def tokenize_documents(tokenizer, texts, end_of_text):
    """One int64 token array per text, ending with <|endoftext|>."""
    if not texts:
        return []
    return [np.array(ids + [end_of_text], dtype=np.int64)
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def token_cache_fingerprint(dataset):
    """What the cached tokens depend on: the data files, the tokenizer and the train/validation split."""
    with open(os.path.join(dataset.tokenizer.name_or_path, "tokenizer.json"), "rb") as f:
        tokenizer_digest = hashlib.sha256(f.read()).hexdigest()
    files = [[os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime] for p in data_files(dataset.data_path)]
    return {"files": files, "tokenizer_sha256": tokenizer_digest, "val_every": dataset.val_every}


_cache_worker = None  # (tokenizer, parse, end_of_text, dtype) in a token cache worker process


def _start_cache_worker(tokenizer, parse, end_of_text, dtype):
    global _cache_worker
    # One thread per worker: the processes are the parallelism. Ctrl-C is the main process's to handle;
    # SIGTERM must kill (the pool's terminate() sends it), whatever handler the forking process had.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _cache_worker = (tokenizer, parse, end_of_text, dtype)


def _tokenize_chunk(rows):
    """(token bytes, bad rows) of a chunk of (index, path, row, raw) rows, in a worker."""
    tokenizer, parse, end_of_text, dtype = _cache_worker
    texts, bad = [], []
    for index, path, row, raw in rows:
        try:
            texts.append(parse_row(raw, parse))
        except BadLine as e:
            bad.append((index, path, row, str(e)))
    docs = tokenize_documents(tokenizer, texts, end_of_text)
    return (np.concatenate(docs).astype(dtype).tobytes() if docs else b""), bad


def _cache_chunks(files, keep, first_index, chunk_rows):
    """(last index, nonblank rows, kept rows) for each run of `chunk_rows` rows after `first_index`."""
    rows, nonblank, last = [], 0, first_index
    for index, path, row, raw in corpus_rows(files):
        if index <= first_index:
            continue  # done before the interruption
        last = index
        if raw is not None:
            nonblank += 1
            if keep(index):
                rows.append((index, path, row, raw))
        if index % chunk_rows == 0:
            yield last, nonblank, rows
            rows, nonblank = [], 0
    if last > first_index and last % chunk_rows:
        yield last, nonblank, rows


def _write_json(path, value):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def build_token_cache(dataset, path, num_workers=1, chunk_rows=1024, save_every=64):
    """Tokenize the training split once into `path` (uint16 or uint32 ids), unless it is up to date.

    `num_workers` processes tokenize chunks of `chunk_rows` rows while this one reads the files and
    writes the tokens in corpus order, so the file is the same bytes whatever the number of workers.
    Every `save_every` chunks the tokens so far are synced to `path`.partial and the position reached to
    `path`.partial.json: an interrupted build (Ctrl-C, a killed job) continues from there on the next
    call with the same data and tokenizer. The complete stream is renamed to `path`, with its fingerprint
    beside it in `path`.json. Returns True when it had to build (or finish) the cache.
    """
    fingerprint = token_cache_fingerprint(dataset)
    meta_path, partial, progress_path = path + ".json", path + ".partial", path + ".partial.json"
    if os.path.exists(path) and os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f) == fingerprint:
                return False
    progress = {"fingerprint": fingerprint, "index": 0, "bytes": 0, "seen": 0, "nonblank": 0, "bad": []}
    if os.path.exists(progress_path) and os.path.exists(partial):
        with open(progress_path) as f:
            saved = json.load(f)
        if saved["fingerprint"] == fingerprint:
            progress = saved
            print(f"continuing the token cache {path} from row {progress['index']:,} "
                  f"({progress['bytes'] / 1e6:.1f} MB done)")
    files = data_files(dataset.data_path)
    bad_rows = BadRows(files, dataset.strict, dataset.max_bad_fraction)
    bad_rows.seen, bad_rows.bad = progress["seen"], [tuple(b) for b in progress["bad"]]
    dtype = cache_dtype(dataset.tokenizer)
    start, start_bytes = time.perf_counter(), progress["bytes"]

    def save_progress(out):
        out.flush()
        os.fsync(out.fileno())
        _write_json(progress_path, {**progress, "seen": bad_rows.seen, "bad": bad_rows.bad})

    context = multiprocessing.get_context("fork")
    with open(partial, "r+b" if progress["bytes"] else "wb") as out, \
            context.Pool(max(1, num_workers), _start_cache_worker,
                         (dataset.tokenizer, dataset.parse, dataset.end_of_text, dtype)) as pool:
        out.truncate(progress["bytes"])
        out.seek(progress["bytes"])
        pending, written = collections.deque(), 0
        chunks = _cache_chunks(files, dataset._keep_line, progress["index"], chunk_rows)
        while True:
            chunk = next(chunks, None)
            if chunk is not None:
                last, nonblank, rows = chunk
                pending.append((last, nonblank, len(rows), pool.apply_async(_tokenize_chunk, (rows,))))
            # A few chunks in flight per worker keep them busy; more would only fill the memory.
            while pending and (chunk is None or len(pending) > 2 * max(1, num_workers)):
                last, nonblank, kept, result = pending.popleft()
                data, bad = result.get()
                bad_rows.seen += kept
                for entry in bad:
                    bad_rows.add(*entry)
                out.write(data)
                progress.update(index=last, bytes=progress["bytes"] + len(data),
                                nonblank=progress["nonblank"] + nonblank)
                written += 1
                if written % save_every == 0:
                    save_progress(out)
            if chunk is None:
                break
        bad_rows.finish(progress["nonblank"], report_after=PROBE_LINES)  # the first: see estimate_samples_per_epoch
        save_progress(out)
    os.replace(partial, path)
    _write_json(meta_path, fingerprint)
    os.remove(progress_path)
    seconds = time.perf_counter() - start
    tokens = progress["bytes"] // np.dtype(dtype).itemsize
    print(f"token cache {path}: {tokens:,} tokens, {progress['bytes'] / 1e6:.1f} MB, built in {seconds:.1f} s "
          f"with {max(1, num_workers)} worker(s) "
          f"({(progress['bytes'] - start_bytes) / np.dtype(dtype).itemsize / seconds:,.0f} tokens/s)")
    return True


def conversation_length(messages):
    return sum(len(m["content"]) for m in messages)


def encode_conversation(tokenizer, messages, max_length):
    """input_ids and labels (-100 outside the assistant's spans), truncated to max_length tokens."""
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    ids = torch.tensor(encoded["input_ids"][:max_length], dtype=torch.long)
    mask = torch.tensor(encoded["assistant_masks"][:max_length], dtype=torch.bool)
    return {"input_ids": ids, "labels": torch.where(mask, ids, -100)}


def collate(samples, pad_id):
    """Pad a batch to its own longest sample (right padding: causal attention never sees it)."""
    width = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    for row, s in enumerate(samples):
        input_ids[row, :len(s["input_ids"])] = s["input_ids"]
        labels[row, :len(s["labels"])] = s["labels"]
    return {"input_ids": input_ids, "labels": labels}


def estimate_rows(path, probe_lines=PROBE_LINES):
    """Rows in a data file: exact for Parquet (its metadata), else its text size over the mean length
    of its first lines."""
    if is_parquet(path):
        import pyarrow.parquet as pq
        return pq.ParquetFile(path).metadata.num_rows
    with open_binary(path) as f:
        lengths = [len(line) for _, line in zip(range(probe_lines), f)]
    return text_bytes(path) * len(lengths) / max(1, sum(lengths))


def estimate_samples_per_epoch(dataset, probe_lines=PROBE_LINES, report=True):
    """Training samples in one pass, from the first rows and the size of the files (a stream has no length).

    Reading these rows through the dataset's parser also checks the data before any training starts:
    an empty corpus, one with no valid row or too many bad ones stops here with DataError, and bad rows
    among them are reported (when `report`).
    """
    values = [v for _, v in read_records(dataset.data_path, dataset.parse, strict=dataset.strict,
                                         max_bad_fraction=dataset.max_bad_fraction,
                                         report_after=0 if report else None, max_lines=probe_lines)]
    files = data_files(dataset.data_path)
    probed = sum(1 for _ in corpus_rows(files, probe_lines))
    scale = sum(estimate_rows(path, probe_lines) for path in files) / probed * (1 - 1 / dataset.val_every)
    if isinstance(dataset, PretrainDataset):
        tokens = sum(len(doc) for doc in dataset._tokenize(values))
        return max(1, int(tokens * scale / dataset.max_length))
    return max(1, int(len(values) * scale))
