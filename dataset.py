"""The datasets the training loop reads: packed blocks for pretraining, chat-template conversations for
SFT, pairs of answers (chosen, rejected) for DPO, prompts for RL; and how their samples are shared among
processes.

Every `val_every`-th row (200th by default) of the corpus (corpus.py) is the validation split. Samples have
a global order that does not depend on the number of processes: sample i goes to rank i % world_size, and
inside a rank whole batches go round-robin to the DataLoader workers. So N ranks with batch b see, per
step, the same samples as one process with batch N*b, and a run resumes anywhere by skipping the samples
it already trained on (`start_sample`). One exception, so that N ranks do not each tokenize the whole
corpus: streaming pretraining on N ranks, where each rank packs its own share of the rows (see
PretrainDataset); the token cache (token_cache.py) keeps the global order.
"""
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from corpus import (PROBE_LINES, DataError, corpus_rows, data_files, estimate_rows, parse_chat, parse_preference,
                    parse_prompt, parse_text, read_records)
from token_cache import cache_dtype, tokenize_documents

RANK_ROWS = 64  # streaming pretraining on N ranks: rows i..i+63 of the corpus go to one rank, in turn


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

    def cached_blocks(self):
        """The number of blocks in one pass over the token cache: exact, unlike a stream's estimate."""
        return len(np.memmap(self.token_cache, dtype=cache_dtype(self.tokenizer), mode="r")) // self.max_length

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

    The template's {% generation %} block marks each assistant turn's content (tool calls included) and
    its <|im_end|>, so the model learns to end its answers; a tool's results and the tools' schemas are
    never labelled. Conversations are sorted by length inside windows of 64 global
    batches, so a padded batch holds similar lengths, and the window's batches are then trained in a
    random order: trained short to long, each window would end on a run of the longest answers (long
    poems, some cut off before their <|im_end|>), and where the run stops would decide whether the model
    ends its answers. The order depends only on the file, the seed and the epoch, so it is global.
    """

    parse = staticmethod(parse_chat)

    def _items(self, epoch):
        conversations = (chat for _, chat in self.records())
        for index, window in enumerate(windows(conversations, self.window)):
            yield from self._length_sorted_batches(window, [self.seed, epoch, index])

    def _length_sorted_batches(self, window, seed):
        """The window's conversations sorted by length, as global batches in random order; a last,
        partial batch stays last, so that every other batch stays whole."""
        window = sorted(window, key=lambda chat: conversation_length(chat[0]))
        size = self.batch_size * self.world_size
        full = len(window) // size
        for batch in np.random.default_rng(seed).permutation(full):
            yield from window[batch * size:(batch + 1) * size]
        yield from window[full * size:]

    def _encode(self, chat):
        messages, tools = chat
        if tools and "tools" not in self.tokenizer.chat_template:
            raise DataError(f"{self.tokenizer.name_or_path}: its chat template renders no tools (a tokenizer "
                            "written before tool calling); train one with tokenizer.py, or save tokenizer.py's "
                            "CHAT_TEMPLATE into it")
        return encode_conversation(self.tokenizer, messages, self.max_length, tools)


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


class PromptDataset(ChatDataset):
    """Prompts for RL (--mode grpo): each a dict of its token ids (a conversation through the chat template,
    with the assistant's turn opened; a plain prompt as it is), the prompt itself and the row's other
    columns, which the reward functions read. A prompt longer than max_length - room keeps its last tokens:
    the question and the opened turn are at its end. The training split is shuffled in windows, as DPO's."""

    parse = staticmethod(parse_prompt)

    def __init__(self, data_path, tokenizer, max_length, room=0, tools=None, **kwargs):
        super().__init__(data_path, tokenizer, max_length, **kwargs)
        self.room = room  # positions left for the completion
        self.tools = tools  # the schemas the chat template offers the model, if any

    def _items(self, epoch):
        prompts = (prompt for _, prompt in self.records())
        if self.split == "val":
            yield from prompts
            return
        for index, window in enumerate(windows(prompts, self.window)):
            for i in np.random.default_rng([self.seed, epoch, index]).permutation(len(window)):
                yield window[i]

    def _encode(self, item):
        prompt, columns = item
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer.apply_chat_template(prompt, tools=self.tools, add_generation_prompt=True,
                                                     tokenize=True, return_dict=True)["input_ids"]
        return {"prompt_ids": ids[-(self.max_length - self.room):], "prompt": prompt, "columns": columns}


def collate_prompts(prompts, pad_id):
    """A batch of prompts stays a list: the rollout pads them itself, and the rewards read their columns."""
    return prompts


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


def conversation_length(messages):
    return sum(len(m["content"]) + len(str(m.get("tool_calls", ""))) for m in messages)


def encode_conversation(tokenizer, messages, max_length, tools=None):
    """input_ids and labels (-100 outside the assistant's spans), truncated to max_length tokens."""
    encoded = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
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
