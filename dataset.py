"""Streaming datasets for pretraining (packed blocks), SFT (chat-template conversations) and DPO (pairs of
answers to one prompt, the chosen and the rejected).

Both read JSONL (`.jsonl` or `.jsonl.gz`) line by line, so a corpus of any size trains in bounded memory.
Samples have a global order that does not depend on the number of processes: sample i goes to rank
i % world_size, and inside a rank whole batches go round-robin to the DataLoader workers. So N ranks with
batch b see, per step, the same samples as one process with batch N*b, and a run resumes anywhere by
skipping the samples it already trained on (`start_sample`).
"""
import gzip
import hashlib
import json
import os
import sys

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

PROBE_LINES = 2000  # lines read before training to check the file and estimate its length
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


def open_binary(path):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def text_bytes(path, sample=64 << 20):
    """Uncompressed size of a data file; for .gz, extrapolated from the first `sample` bytes' ratio."""
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


def read_jsonl(path, parse, keep=None, strict=False, max_bad_fraction=0.01, report_after=0,
               max_lines=None):
    """Yield (line_number, parse(record)) for each good line of a JSONL file, in file order.

    A bad line (invalid UTF-8 or JSON, or rejected by `parse` with BadLine) is skipped and counted; at the
    end one warning gives the count and the first positions of those after line `report_after` (None:
    no warning). It stops with DataError on the first bad line when `strict`, when bad lines exceed
    `max_bad_fraction`, or when no line is good. `keep(line_number)` selects lines before they are
    parsed; `max_lines` stops early.
    """
    seen, bad, nonblank = 0, [], 0
    with open_binary(path) as f:
        for line_number, raw in enumerate(f, 1):
            if max_lines is not None and line_number > max_lines:
                break
            if not raw.strip():
                continue
            nonblank += 1
            if keep is not None and not keep(line_number):
                continue
            seen += 1
            try:
                record = json.loads(raw.decode("utf-8"))
                if not isinstance(record, dict):
                    raise BadLine("not a JSON object")
                value = parse(record)
            except UnicodeDecodeError:
                reason = "invalid UTF-8"
            except json.JSONDecodeError as e:
                reason = f"invalid JSON ({e.msg})"
            except BadLine as e:
                reason = str(e)
            else:
                yield line_number, value
                continue
            if strict:
                raise DataError(f"{path}:{line_number}: {reason} (--strict stops at the first bad line)")
            bad.append((line_number, reason))
            if seen >= 1000 and len(bad) > max_bad_fraction * seen:
                raise DataError(_too_many_bad(path, seen, bad, max_bad_fraction))
    if nonblank == 0:
        raise DataError(f"{path}: the file is empty")
    if seen and seen == len(bad):
        raise DataError(f"{path}: no valid sample ({_positions(path, bad)})")
    if len(bad) > max_bad_fraction * seen:
        raise DataError(_too_many_bad(path, seen, bad, max_bad_fraction))
    reported = [(line, reason) for line, reason in bad if report_after is not None and line > report_after]
    if reported:
        where = f" after its first {report_after} lines" if report_after else ""
        print(f"warning: skipped {len(reported)} bad line(s) in {path}{where}: {_positions(path, reported)}",
              file=sys.stderr)


def _positions(path, bad):
    shown = "; ".join(f"{path}:{line}: {reason}" for line, reason in bad[:3])
    return shown + (" ..." if len(bad) > 3 else "")


def _too_many_bad(path, seen, bad, max_bad_fraction):
    return (f"{path}: {len(bad)} of the first {seen} lines are bad, more than --max_bad_fraction "
            f"{max_bad_fraction} ({_positions(path, bad)})")


class JsonlDataset(IterableDataset):
    """The shared machinery: passes over the file, the train/validation split, sharding and skipping.

    Every `val_every`-th line is held out for validation. Subclasses define `_items(epoch)`, the items of
    one pass in global order (the same on every rank: it depends only on the file, `seed` and `epoch`),
    and `_encode(item)`, the sample dict, run only for the items this process owns.
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

    def _keep_line(self, line_number):
        held_out = line_number % self.val_every == 0
        return held_out if self.split == "val" else not held_out

    def records(self):
        """Good lines of this split. Bad lines of the first PROBE_LINES were reported by
        `estimate_samples_per_epoch`; the rest are reported once, by one process, after the first pass.
        Validation lines are too few for a meaningful share, so only the training split can stop on it."""
        info = get_worker_info()
        reporter = self.rank == 0 and (info is None or info.id == 0)
        training = self.split == "train"
        return read_jsonl(self.data_path, self.parse, keep=self._keep_line, strict=self.strict,
                          max_bad_fraction=self.max_bad_fraction if training else 1.0,
                          report_after=PROBE_LINES if training and reporter and self._first_pass else None)

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        index = 0  # global sample index, counted across epochs
        for epoch in range(self.epochs):
            self._first_pass = epoch == 0
            for item in self._items(epoch):
                relative = index - self.start_sample
                index += 1
                if relative < 0 or relative % self.world_size != self.rank:
                    continue
                local_batch = (relative // self.world_size) // self.batch_size
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
    """

    parse = staticmethod(parse_text)

    def __init__(self, data_path, tokenizer, max_length, token_cache=None, window_batches=64, **kwargs):
        super().__init__(data_path, tokenizer, max_length, **kwargs)
        self.window = window_batches * self.batch_size * self.world_size
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
        if not texts:
            return
        for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
            yield np.array(ids + [self.end_of_text], dtype=np.int64)

    def _items(self, epoch):
        if self.split == "val":
            yield from self._blocks()
            return
        for index, window in enumerate(windows(self._blocks(), self.window)):
            for i in np.random.default_rng([self.seed, epoch, index]).permutation(len(window)):
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


class SFTDataset(JsonlDataset):
    """Conversations rendered with the tokenizer's chat template; loss only on what the assistant says.

    The template's {% generation %} block marks each assistant turn's content and its <|im_end|>, so the
    model learns to end its answers. Conversations are sorted by length inside windows of 64 global
    batches, so a padded batch holds similar lengths, and the window's batches are then trained in a
    random order: trained short to long, each window would end on a run of the longest answers (long
    poems, some cut off before their <|im_end|>), and where the run stops would decide whether the model
    ends its answers. The order depends only on the file, the seed and the epoch, so it is global.
    """

    parse = staticmethod(parse_conversation)

    def __init__(self, data_path, tokenizer, max_length, window_batches=64, **kwargs):
        super().__init__(data_path, tokenizer, max_length, **kwargs)
        self.window = window_batches * self.batch_size * self.world_size
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')}: has no chat template; "
                            "SFT needs one (train it with tokenizer.py)")

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


class PreferenceDataset(JsonlDataset):
    """Preference pairs for DPO: the prompt followed by the chosen answer, and by the rejected one, each
    labelled (for the loss) on the answer's assistant tokens only, not on assistant turns of the prompt.
    The training split's pairs are shuffled in windows of 64 global batches, as pretraining's blocks."""

    parse = staticmethod(parse_preference)

    def __init__(self, data_path, tokenizer, max_length, window_batches=64, **kwargs):
        super().__init__(data_path, tokenizer, max_length, **kwargs)
        self.window = window_batches * self.batch_size * self.world_size
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')}: has no chat template; "
                            "DPO needs one (train it with tokenizer.py)")

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


def token_cache_fingerprint(dataset):
    """What the cached tokens depend on: the data file, the tokenizer and the train/validation split."""
    with open(os.path.join(dataset.tokenizer.name_or_path, "tokenizer.json"), "rb") as f:
        tokenizer_digest = hashlib.sha256(f.read()).hexdigest()
    stat = os.stat(dataset.data_path)
    return {"data_path": os.path.abspath(dataset.data_path), "size": stat.st_size, "mtime": stat.st_mtime,
            "tokenizer_sha256": tokenizer_digest, "val_every": dataset.val_every}


def build_token_cache(dataset, path):
    """Tokenize the training split once into `path` (uint16 or uint32 ids), unless it is up to date.

    The stream is written in pieces and renamed into place when complete, with its fingerprint beside
    it in `path`.json; returns True when it had to be built.
    """
    fingerprint = token_cache_fingerprint(dataset)
    meta_path = path + ".json"
    if os.path.exists(path) and os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f) == fingerprint:
                return False
    tmp = f"{path}.tmp{os.getpid()}"
    dtype = cache_dtype(dataset.tokenizer)
    with open(tmp, "wb") as f:
        for doc in dataset._documents():
            f.write(doc.astype(dtype).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with open(meta_path, "w") as f:
        json.dump(fingerprint, f)
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


def estimate_samples_per_epoch(dataset, probe_lines=PROBE_LINES, report=True):
    """Training samples in one pass, from the first lines and the file size (a stream has no length).

    Reading these lines through the dataset's parser also checks the file before any training starts:
    an empty file, one with no valid line or too many bad ones stops here with DataError, and bad lines
    among them are reported (when `report`).
    """
    values = [v for _, v in read_jsonl(dataset.data_path, dataset.parse, strict=dataset.strict,
                                       max_bad_fraction=dataset.max_bad_fraction,
                                       report_after=0 if report else None, max_lines=probe_lines)]
    with open_binary(dataset.data_path) as f:
        probe_bytes = sum(len(line) for _, line in zip(range(probe_lines), f))
    scale = text_bytes(dataset.data_path) / probe_bytes * (1 - 1 / dataset.val_every)
    if isinstance(dataset, PretrainDataset):
        tokens = sum(len(doc) for doc in dataset._tokenize(values))
        return max(1, int(tokens * scale / dataset.max_length))
    return max(1, int(len(values) * scale))
