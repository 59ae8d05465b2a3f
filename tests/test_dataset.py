"""Datasets: SFT loss masks, pretraining packing, sharding and resuming, workers, length grouping."""
import gzip
import json
import os
import random

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import DATA_DIR, shipped_lines, write_jsonl
from corpus import parse_conversation
from dataset import PretrainDataset, SFTDataset, collate, encode_conversation, estimate_samples_per_epoch
from token_cache import build_token_cache

PRETRAIN_GZ = os.path.join(DATA_DIR, "pretrain_poetry.jsonl.gz")
SFT_GZ = os.path.join(DATA_DIR, "sft_poetry.jsonl.gz")
VAL_EVERY = 200  # the datasets' default: every 200th line is held out


def train_lines(records, val_every=VAL_EVERY):
    """The records of the training split (line numbers start at 1)."""
    return [r for i, r in enumerate(records, 1) if i % val_every != 0]


# --- SFT: the loss mask is exactly the assistant's spans ------------------------------------------

HANDMADE = [
    {"messages": [
        {"role": "system", "content": "你是一个熟读古诗词的AI助手。"},
        {"role": "user", "content": "请背诵《静夜思》。"},
        {"role": "assistant", "content": "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"},
        {"role": "user", "content": "作者是谁？"},
        {"role": "assistant", "content": "李白 🌙👍🏽"},
        {"role": "user", "content": "再说一遍"},
        {"role": "assistant", "content": "\n  是李白。\n"},
    ]},
    {"messages": [
        {"role": "user", "content": "Say hi in Python."},
        {"role": "assistant", "content": "print('hi')\n\tpass"},
    ]},
    {"conversations": [
        {"from": "human", "value": "《蓦山溪》的作者是谁？"},
        {"from": "gpt", "value": "黄庭坚。"},
        {"from": "human", "value": "他是哪个朝代的？"},
        {"from": "assistant", "value": "北宋。"},
    ]},
]


def _runs(mask):
    """(start, end) of each run of True in a 1-D bool tensor."""
    runs, start = [], None
    for i, value in enumerate(mask.tolist() + [False]):
        if value and start is None:
            start = i
        elif not value and start is not None:
            runs.append((start, i))
            start = None
    return runs


def check_sft_sample(tokenizer, messages, sample):
    ids, labels = sample["input_ids"], sample["labels"]
    assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape
    mask = labels != -100
    assert torch.equal(labels[mask], ids[mask])  # labelled positions carry their own token
    assistants = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = _runs(mask)
    assert len(runs) == len(assistants)
    expected_unlabelled = ""
    turn = 0
    for m in messages:
        expected_unlabelled += f"<|im_start|>{m['role']}\n"
        if m["role"] != "assistant":
            expected_unlabelled += f"{m['content']}<|im_end|>\n"
            continue
        start, end = runs[turn]
        text = tokenizer.decode(ids[start:end])
        assert text in (assistants[turn] + "<|im_end|>", assistants[turn] + "<|im_end|>\n"), text
        assert tokenizer.eos_token_id in ids[start:end].tolist()
        if not text.endswith("\n"):
            expected_unlabelled += "\n"
        turn += 1
    # Everything else, system and user turns included, carries no loss.
    assert tokenizer.decode(ids[~mask]) == expected_unlabelled
    # The labelled eos is <|im_end|>, which must not be the padding token.
    assert tokenizer.decode(ids[mask]).count("<|im_end|>") == len(assistants)
    assert int((labels == tokenizer.eos_token_id).sum()) == len(assistants)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


@pytest.mark.parametrize("index", range(len(HANDMADE)))
def test_sft_labels_are_the_assistant_spans_handmade(tokenizer, index):
    messages = parse_conversation(HANDMADE[index])
    check_sft_sample(tokenizer, messages, encode_conversation(tokenizer, messages, 4096))


def test_belle_roles_are_mapped():
    messages = parse_conversation(HANDMADE[2])
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1]["content"] == "黄庭坚。"


@pytest.mark.parametrize("name,count", [("sft_poetry.jsonl.gz", 150), ("sft_poetry_belle.jsonl.gz", 100)])
def test_sft_labels_are_the_assistant_spans_shipped(tokenizer, name, count):
    records = shipped_lines(name, count)
    assert any(sum(m.get("role") == "assistant" for m in r.get("messages", [])) > 1 for r in records) \
        or name.endswith("belle.jsonl.gz")  # the messages file has multi-turn conversations
    for record in records:
        messages = parse_conversation(record)
        check_sft_sample(tokenizer, messages, encode_conversation(tokenizer, messages, 4096))


@pytest.mark.parametrize("fixture", ["sft_file", "belle_file"])
def test_sft_dataset_yields_the_assistant_spans(tokenizer, request, fixture):
    path = request.getfixturevalue(fixture)
    with open(path, encoding="utf-8") as f:
        records = train_lines([json.loads(line) for line in f])
    dataset = SFTDataset(path, tokenizer, 4096)
    samples = list(dataset)
    assert len(samples) == len(records)

    def labelled_text(sample):
        return tokenizer.decode(sample["input_ids"][sample["labels"] != -100])

    expected = sorted("".join(m["content"] + "<|im_end|>" for m in parse_conversation(r)
                              if m["role"] == "assistant") for r in records)
    assert sorted(labelled_text(s) for s in samples) == expected


def test_truncation_to_max_length(tokenizer):
    messages = parse_conversation(HANDMADE[0])
    full = encode_conversation(tokenizer, messages, 4096)
    cut = encode_conversation(tokenizer, messages, 20)
    assert len(cut["input_ids"]) == 20
    assert torch.equal(cut["input_ids"], full["input_ids"][:20])
    assert torch.equal(cut["labels"], full["labels"][:20])


def test_collate_pads_with_pad_id_to_the_longest_in_the_batch(tokenizer):
    samples = [encode_conversation(tokenizer, parse_conversation(r), 4096) for r in HANDMADE]
    lengths = [len(s["input_ids"]) for s in samples]
    assert len(set(lengths)) == len(lengths)
    for batch_samples in (samples, samples[1:]):
        batch = collate(batch_samples, tokenizer.pad_token_id)
        width = max(len(s["input_ids"]) for s in batch_samples)
        assert batch["input_ids"].shape == batch["labels"].shape == (len(batch_samples), width)
        for row, s in enumerate(batch_samples):
            n = len(s["input_ids"])
            assert torch.equal(batch["input_ids"][row, :n], s["input_ids"])
            assert torch.equal(batch["labels"][row, :n], s["labels"])
            assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
            assert (batch["labels"][row, n:] == -100).all()
        # Padding never hides an eos: every assistant turn still has its labelled <|im_end|>.
        turns = sum(sum(m["role"] == "assistant" for m in parse_conversation(r))
                    for r in HANDMADE[len(samples) - len(batch_samples):])
        assert int((batch["labels"] == tokenizer.eos_token_id).sum()) == turns


# --- pretraining: packing -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped_pretrain(tokenizer):
    """The dataset over the whole shipped pretraining sample at max_length 512, and all its blocks."""
    dataset = PretrainDataset(PRETRAIN_GZ, tokenizer, 512)
    return dataset, list(dataset)


def test_pretrain_blocks_are_full(shipped_pretrain):
    _, samples = shipped_pretrain
    assert len(samples) > 1000
    for s in samples:
        assert s["input_ids"].shape == (512,) and s["input_ids"].dtype == torch.long
        assert torch.equal(s["labels"], s["input_ids"])


def test_pretrain_blocks_concatenate_to_the_token_stream(tokenizer, tmp_path):
    records = shipped_lines("pretrain_poetry.jsonl.gz", 2000)
    path = write_jsonl(tmp_path / "pretrain.jsonl", records)
    samples = [{"input_ids": torch.from_numpy(b)} for b in PretrainDataset(path, tokenizer, 512)._blocks()]
    texts = [r["text"] for r in train_lines(records)]
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    stream = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += ids + [eot]
    blocks = torch.cat([s["input_ids"] for s in samples])
    assert len(samples) == len(stream) // 512  # only the last partial block is dropped
    assert blocks.tolist() == stream[:len(blocks)]
    # Documents are separated by <|endoftext|>: the pieces between them are the texts, in order.
    pieces = blocks.numpy()
    ends = (pieces == eot).nonzero()[0]
    assert len(ends) > 0.99 * len(texts)
    starts = [0] + (ends[:-1] + 1).tolist()
    docs = [pieces[a:b].tolist() for a, b in zip(starts, ends)]
    assert tokenizer.batch_decode(docs) == texts[:len(docs)]


def test_pretrain_positions_without_loss_are_rare(shipped_pretrain):
    _, samples = shipped_pretrain
    labels = torch.stack([s["labels"] for s in samples])
    # Positions with no target: label -100, or the last one of a block (no next token in the block).
    without_loss = int((labels[:, :-1] == -100).sum()) + labels.shape[0]
    assert without_loss / labels.numel() <= 0.01


def test_pretrain_short_documents_are_packed_together(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "short.jsonl", [{"text": f"第{i}首"} for i in range(1, 60)])
    samples = list(PretrainDataset(path, tokenizer, 16))
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert samples and all(len(s["input_ids"]) == 16 for s in samples)
    assert all(int((s["input_ids"] == eot).sum()) >= 2 for s in samples)


# --- the training/validation split ------------------------------------------------------------------

def test_train_and_val_lines_are_disjoint(tokenizer, pretrain_file):
    def lines(split, val_every):
        dataset = PretrainDataset(pretrain_file, tokenizer, 16, split=split, val_every=val_every)
        return dict(dataset.records())

    for val_every in (VAL_EVERY, 7):
        train, val = lines("train", val_every), lines("val", val_every)
        assert val and train
        assert not set(train) & set(val)
        assert not set(train.values()) & set(val.values())
        assert sorted(set(train) | set(val)) == list(range(1, 401))
        assert len(val) == 400 // val_every


def test_val_blocks_come_from_held_out_lines_only(tokenizer, pretrain_file):
    with open(pretrain_file, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    held_out = [r["text"] for i, r in enumerate(records, 1) if i % 7 == 0]
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    stream = []
    for ids in tokenizer(held_out, add_special_tokens=False)["input_ids"]:
        stream += ids + [eot]
    val = list(PretrainDataset(pretrain_file, tokenizer, 16, split="val", val_every=7))
    assert torch.cat([s["input_ids"] for s in val]).tolist() == stream[:len(val) * 16]
    assert len(val) == len(stream) // 16


# --- sharding, resuming and workers -------------------------------------------------------------------

def _dataset(kind, path, tokenizer, **kwargs):
    if kind == "pretrain":
        return PretrainDataset(path, tokenizer, 32, **kwargs)
    return SFTDataset(path, tokenizer, 64, **kwargs)


def _same_samples(a, b):
    return len(a) == len(b) and all(torch.equal(x["input_ids"], y["input_ids"]) and
                                    torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))


@pytest.fixture
def data_for(pretrain_file, sft_file):
    return {"pretrain": pretrain_file, "sft": sft_file}


@pytest.fixture
def global_order(tokenizer, pretrain_file, tmp_path):
    """Dataset arguments that give every number of ranks the same global order: for pretraining, the
    token cache (streaming ranks pack their own rows, see test_streaming_ranks_tokenize_their_own_rows)."""
    cache = str(tmp_path / "tokens.bin")
    build_token_cache(PretrainDataset(pretrain_file, tokenizer, 32), cache)
    return {"pretrain": {"token_cache": cache}, "sft": {}}


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_two_ranks_see_the_global_batch(tokenizer, data_for, global_order, kind):
    path, order = data_for[kind], global_order[kind]
    single = list(_dataset(kind, path, tokenizer, batch_size=4, **order))
    ranks = [list(_dataset(kind, path, tokenizer, batch_size=2, rank=r, world_size=2, **order))
             for r in range(2)]
    assert len(single) > 40
    assert len(ranks[0]) + len(ranks[1]) == len(single)
    for r in range(2):
        assert _same_samples(ranks[r], single[r::2])
    # Per global batch: the union of the two ranks' batches of 2 is the single process's batch of 4.
    pad = tokenizer.pad_token_id
    for j in range(len(single) // 4):
        union = [ranks[0][2 * j], ranks[1][2 * j], ranks[0][2 * j + 1], ranks[1][2 * j + 1]]
        global_batch = collate(single[4 * j:4 * j + 4], pad)
        assert torch.equal(collate(union, pad)["input_ids"], global_batch["input_ids"])
        assert torch.equal(collate(union, pad)["labels"], global_batch["labels"])
        # The same through DataLoader-style batches of each rank (rows of rank 0 and rank 1 interleaved).
        rank_batches = [collate(ranks[r][2 * j:2 * j + 2], pad) for r in range(2)]
        width = global_batch["input_ids"].shape[1]
        for r in range(2):
            w = rank_batches[r]["input_ids"].shape[1]
            assert w <= width
            assert torch.equal(rank_batches[r]["input_ids"], global_batch["input_ids"][r::2, :w])
            assert (global_batch["labels"][r::2, w:] == -100).all()


def test_two_ranks_pretrain_batches_through_dataloaders(tokenizer, pretrain_file, global_order):
    order = global_order["pretrain"]
    single = list(DataLoader(_dataset("pretrain", pretrain_file, tokenizer, batch_size=4, **order), batch_size=4))
    ranks = [list(DataLoader(_dataset("pretrain", pretrain_file, tokenizer, batch_size=2, rank=r,
                                      world_size=2, **order), batch_size=2)) for r in range(2)]
    full_steps = [j for j in range(min(len(ranks[0]), len(ranks[1])))
                  if len(ranks[0][j]["input_ids"]) == len(ranks[1][j]["input_ids"]) == 2]
    assert len(full_steps) >= len(single) - 1 > 10
    for j in full_steps:
        union = torch.stack([ranks[0][j]["input_ids"], ranks[1][j]["input_ids"]], dim=1).reshape(-1, 32)
        assert torch.equal(union, single[j]["input_ids"])


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_start_sample_skips_exactly(tokenizer, data_for, global_order, kind, world_size):
    path, order = data_for[kind], global_order[kind]
    # The global order is that of one process with the global batch (SFT sorts windows of global batches).
    full = list(_dataset(kind, path, tokenizer, batch_size=2 * world_size, **order))
    for start in (0, 5, 37):
        for rank in range(world_size):
            resumed = list(_dataset(kind, path, tokenizer, batch_size=2, start_sample=start, rank=rank,
                                    world_size=world_size, **order))
            assert _same_samples(resumed, full[start:][rank::world_size])


def test_streaming_ranks_tokenize_their_own_rows(tokenizer, tmp_path):
    """Streaming pretraining on 2 ranks: each rank tokenizes its own runs of RANK_ROWS rows, about half of
    the corpus, and together they tokenize every training document once. Each packs and shuffles its own
    blocks (so they are not one process's blocks: that guarantee is the token cache's), and a resume on
    the same number of ranks skips exactly what each rank trained on."""
    records = shipped_lines("pretrain_poetry.jsonl.gz", 1000)
    path = write_jsonl(tmp_path / "pretrain.jsonl", records)
    texts = [r["text"] for r in train_lines(records)]

    def docs(dataset):
        return [tokenizer.decode(d[:-1]) for d in dataset._documents()]

    single = docs(PretrainDataset(path, tokenizer, 32))
    ranks = [PretrainDataset(path, tokenizer, 32, batch_size=2, rank=r, world_size=2) for r in range(2)]
    shares = [docs(d) for d in ranks]
    assert single == texts
    assert sorted(shares[0] + shares[1]) == sorted(texts)
    tokens = [sum(len(d) for d in dataset._documents()) for dataset in ranks]
    total = sum(len(d) for d in PretrainDataset(path, tokenizer, 32)._documents())
    assert sum(tokens) == total and max(tokens) <= 0.6 * total, (tokens, total)
    for r, dataset in enumerate(ranks):
        samples = list(dataset)
        assert len(samples) == sum(len(d) for d in dataset._documents()) // 32
        resumed = list(PretrainDataset(path, tokenizer, 32, batch_size=2, rank=r, world_size=2, start_sample=10))
        assert _same_samples(resumed, samples[5:])


def test_start_sample_continues_across_epochs(tokenizer, pretrain_file):
    one = list(_dataset("pretrain", pretrain_file, tokenizer))
    both = list(_dataset("pretrain", pretrain_file, tokenizer, epochs=2))
    two = list(_dataset("pretrain", pretrain_file, tokenizer, epochs=2, start_sample=len(one) - 3))
    assert _same_samples(both[:len(one)], one)
    assert _same_samples(two, both[len(one) - 3:])


def test_pretrain_blocks_are_shuffled_in_windows_and_differently_each_epoch(tokenizer, pretrain_file,
                                                                           global_order):
    """Each epoch is a permutation of the file-order blocks, within windows of window_batches global
    batches; the second epoch's order is not the first's, the seed changes it, the ranks share it (with the
    token cache: streaming ranks shuffle their own blocks)."""
    def blocks(**kwargs):
        return [tuple(s["input_ids"].tolist()) for s in PretrainDataset(pretrain_file, tokenizer, 32,
                                                                           window_batches=4, **kwargs)]
    in_file_order = [tuple(b.tolist()) for b in PretrainDataset(pretrain_file, tokenizer, 32)._blocks()]
    epochs = blocks(batch_size=4, epochs=2)
    n, window = len(in_file_order), 4 * 4
    assert n > 3 * window
    first, second = epochs[:n], epochs[n:]
    for order in (first, second):
        for start in range(0, n, window):  # a permutation of each window, so of the whole epoch
            assert sorted(order[start:start + window]) == sorted(in_file_order[start:start + window])
    assert first != in_file_order and second != first
    assert blocks(batch_size=4, seed=1) != first
    ranks = [blocks(batch_size=2, rank=r, world_size=2, **global_order["pretrain"]) for r in range(2)]
    assert ranks[0] == first[0::2] and ranks[1] == first[1::2]


def _batches(dataset, batch_size, num_workers, pad_id):
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=lambda samples: collate(samples, pad_id))
    return list(loader)


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_workers_give_the_same_batches_in_the_same_order(tokenizer, data_for, kind):
    path, pad = data_for[kind], tokenizer.pad_token_id
    plain = _batches(_dataset(kind, path, tokenizer, batch_size=4), 4, 0, pad)
    workers = _batches(_dataset(kind, path, tokenizer, batch_size=4), 4, 2, pad)
    assert len(plain) == len(workers) > 10
    for a, b in zip(plain, workers):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["labels"], b["labels"])
    # With a rank and a resume point as well.
    kwargs = dict(batch_size=4, rank=1, world_size=2, start_sample=3)
    plain = _batches(_dataset(kind, path, tokenizer, **kwargs), 4, 0, pad)
    workers = _batches(_dataset(kind, path, tokenizer, **kwargs), 4, 2, pad)
    assert len(plain) == len(workers) > 3
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(plain, workers))


# --- SFT length grouping -----------------------------------------------------------------------------

def _padding_fraction(samples, batch_size, pad_id):
    padded = real = 0
    for i in range(0, len(samples), batch_size):
        batch = collate(samples[i:i + batch_size], pad_id)
        padded += batch["input_ids"].numel()
        real += sum(len(s["input_ids"]) for s in samples[i:i + batch_size])
    return 1 - real / padded


def test_sft_batches_group_similar_lengths(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", shipped_lines("sft_poetry.jsonl.gz", 2000))
    samples = list(SFTDataset(path, tokenizer, 512, batch_size=16))
    assert len(samples) == len(train_lines(range(2000)))
    grouped = _padding_fraction(samples, 16, tokenizer.pad_token_id)
    shuffled = samples[:]
    random.Random(0).shuffle(shuffled)
    unsorted = _padding_fraction(shuffled, 16, tokenizer.pad_token_id)
    # Measured on this sample: 0.153 grouped, 0.585 in random order (0.035 if sorted by token count).
    assert grouped < 0.2
    assert grouped < unsorted / 3


# --- estimate_samples_per_epoch ----------------------------------------------------------------------

def test_estimate_for_shipped_pretrain(shipped_pretrain):
    dataset, samples = shipped_pretrain
    assert estimate_samples_per_epoch(dataset) == pytest.approx(len(samples), rel=0.1)


def test_estimate_for_shipped_sft(tokenizer):
    dataset = SFTDataset(SFT_GZ, tokenizer, 512)
    true_count = sum(1 for _ in dataset._items(0))
    assert true_count == len(train_lines(range(8000)))
    assert estimate_samples_per_epoch(dataset) == pytest.approx(true_count, rel=0.1)


def test_estimate_for_a_large_gzipped_file(tokenizer, tmp_path):
    """A .jsonl.gz holding more than 64 MB of text (compressed 500x here): the rest of the file must be
    counted as text, not as its compressed size on disk."""
    line = (json.dumps({"messages": [{"role": "user", "content": "问" * 10},
                                     {"role": "assistant", "content": "答" * 300}]},
                       ensure_ascii=False) + "\n").encode("utf-8")
    lines = (130 << 20) // len(line)
    path = str(tmp_path / "sft_big.jsonl.gz")
    with gzip.open(path, "wb", compresslevel=1) as f:
        chunk = line * 4096
        for _ in range(lines // 4096):
            f.write(chunk)
        f.write(line * (lines % 4096))
    true_count = lines - lines // VAL_EVERY
    estimate = estimate_samples_per_epoch(SFTDataset(path, tokenizer, 512))
    assert estimate == pytest.approx(true_count, rel=0.1)


def test_sft_batches_come_in_random_order_not_short_to_long(tokenizer, tmp_path):
    """Sorted windows trained short to long end each window on the longest answers, which swings the
    model's estimate of where answers end: the batches of a window come in a seeded random order."""
    # 300 lines: two windows of 8 batches of 16 and part of a third in each epoch.
    path = write_jsonl(tmp_path / "sft.jsonl", shipped_lines("sft_poetry.jsonl.gz", 300))
    per_epoch, batches_per_window = len(train_lines(range(300))), 8

    def epochs_of_batches(seed):
        """Per epoch, the batches (as lists of sample lengths) of the first window."""
        dataset = SFTDataset(path, tokenizer, 512, batch_size=16, window_batches=batches_per_window,
                             seed=seed, epochs=2)
        lengths = [len(s["input_ids"]) for s in dataset]
        assert len(lengths) == 2 * per_epoch
        return [[lengths[e * per_epoch + i:e * per_epoch + i + 16] for i in range(0, 16 * batches_per_window, 16)]
                for e in range(2)]

    first, second = epochs_of_batches(seed=0)
    means = [sum(b) / len(b) for b in first]
    assert means != sorted(means), "the window's batches came short to long"
    # The same batches (runs of the window sorted by length), in another order in each epoch and seed;
    # the same order for the same seed, as every rank must compute it.
    assert second != first and sorted(second) == sorted(first)
    other_seed = epochs_of_batches(seed=1)[0]
    assert other_seed != first and sorted(other_seed) == sorted(first)
    assert epochs_of_batches(seed=0)[0] == first
