"""Corpora of many files: shards in JSONL, .jsonl.gz and Parquet, directories and glob patterns, the
validation split across shards, bad rows as file:row, and the token cache built by several processes,
interrupted and continued.

The oracle for shards is the same documents in one JSONL file, read by the code paths that already
train on one file; for Parquet, files written by pyarrow itself.
"""
import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import corpus
import token_cache
from conftest import TINY_MODEL_ARGS, read_metrics, run_main, shipped_lines, write_jsonl
from corpus import data_files, read_records
from dataset import PretrainDataset, SFTDataset
from token_cache import build_token_cache
from tokenizer import sample_texts

SHARD_ROWS = [130, 170, 100]  # not multiples of the validation stride: the split must run across shards


def write_parquet(path, records, row_group_size=32):
    """Records as a Parquet file of several row groups (pyarrow infers the nested `messages` type)."""
    pq.write_table(pa.Table.from_pylist(records), str(path), row_group_size=row_group_size)
    return str(path)


def write_gz(path, records):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return str(path)


def write_shards(directory, records):
    """The records cut into a .jsonl, a .jsonl.gz and a .parquet shard whose sorted names keep their order."""
    os.makedirs(directory, exist_ok=True)
    a, b = SHARD_ROWS[0], SHARD_ROWS[0] + SHARD_ROWS[1]
    return [write_jsonl(os.path.join(directory, "part-0.jsonl"), records[:a]),
            write_gz(os.path.join(directory, "part-1.jsonl.gz"), records[a:b]),
            write_parquet(os.path.join(directory, "part-2.parquet"), records[b:])]


@pytest.fixture
def pretrain_records():
    records = shipped_lines("pretrain_poetry.jsonl.gz", sum(SHARD_ROWS))
    records[150] = {"text": None}  # a bad row inside the .jsonl.gz shard (null in Parquet too)
    return records


def same_samples(a, b):
    return len(a) == len(b) and all(torch.equal(x["input_ids"], y["input_ids"]) and
                                    torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_shards_give_exactly_the_blocks_of_one_file(tokenizer, tmp_path, pretrain_records, kind):
    records = pretrain_records if kind == "pretrain" else shipped_lines("sft_poetry.jsonl.gz", sum(SHARD_ROWS))
    one_file = write_jsonl(tmp_path / "one.jsonl", records)
    shards = write_shards(tmp_path / "shards", records)

    def samples(path, **kwargs):
        if kind == "pretrain":
            return list(PretrainDataset(path, tokenizer, 32, batch_size=4, window_batches=4, **kwargs))
        return list(SFTDataset(path, tokenizer, 64, batch_size=4, window_batches=4, **kwargs))

    for kwargs in ({}, {"split": "val", "val_every": 7}, {"epochs": 2, "start_sample": 5},
                   {"rank": 1, "world_size": 2}):
        expected = samples(one_file, **kwargs)
        assert len(expected) > 5
        # The directory, the files in any order, a glob pattern: all the same corpus.
        for data_path in (str(tmp_path / "shards"), shards[::-1], str(tmp_path / "shards" / "part-*")):
            assert same_samples(samples(data_path, **kwargs), expected), (kwargs, data_path)


def test_bad_rows_are_reported_as_file_and_row(tmp_path, pretrain_records, capsys):
    shards = write_shards(tmp_path / "shards", pretrain_records)
    parquet_records = pretrain_records[sum(SHARD_ROWS[:2]):]
    parquet_records[40] = {"text": ""}
    write_parquet(shards[2], parquet_records)
    rows = list(read_records(shards, corpus.parse_text, report_after=0))
    assert len(rows) == sum(SHARD_ROWS) - 2
    warning = capsys.readouterr().err
    # Row 150 of the corpus is row 20 of the .jsonl.gz shard; the Parquet shard's row 41 is its 41st row.
    assert f"{shards[1]}:21: no non-empty string field 'text'" in warning, warning
    assert f"{shards[2]}:41: no non-empty string field 'text'" in warning, warning


def test_data_files_sorts_and_finds(tmp_path):
    os.makedirs(tmp_path / "b")
    os.makedirs(tmp_path / "empty")
    write_jsonl(tmp_path / "b" / "x.jsonl", [{"text": "a"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    write_parquet(tmp_path / "b" / "c.parquet", [{"text": "a"}])
    (tmp_path / "b" / "notes.txt").write_text("not data")
    expected = [str(tmp_path / "a.jsonl"), str(tmp_path / "b" / "c.parquet"), str(tmp_path / "b" / "x.jsonl")]
    assert data_files(str(tmp_path)) == expected
    assert data_files([str(tmp_path / "b"), str(tmp_path / "*.jsonl"), str(tmp_path / "a.jsonl")]) == expected
    for spec, message in ((tmp_path / "none.jsonl", "does not exist"), (tmp_path / "*.parquet", "no file matches"),
                          (tmp_path / "empty", "holds no")):
        with pytest.raises(corpus.DataError, match=message):
            data_files(str(spec))


def test_tokenizer_samples_the_same_texts_from_shards(tmp_path, pretrain_records):
    records = [r for r in pretrain_records if r["text"]]
    one_file = write_jsonl(tmp_path / "one.jsonl", records)
    write_shards(tmp_path / "shards", records)
    for budget in (10 ** 9, 20_000):  # everything; one row in k
        assert list(sample_texts([str(tmp_path / "shards")], budget)) == list(sample_texts([one_file], budget))


@pytest.mark.slow
def test_training_on_a_directory_of_shards_equals_one_file(tmp_path, pretrain_records):
    one_file = write_jsonl(tmp_path / "one.jsonl", pretrain_records)
    write_shards(tmp_path / "shards", pretrain_records)

    def losses(data, name):
        out = tmp_path / name
        argv = ["--out_dir", out, *TINY_MODEL_ARGS, "--max_steps", "3", "--batch_size", "4", "--log_interval", "1",
                "--eval_interval", "1000", "--eval_batches", "1", "--save_interval", "0", "--data_path", *data]
        assert run_main(argv) is None
        return read_metrics(out)

    expected = losses([one_file], "one")
    assert [r["step"] for r in expected] == [1, 2, 3, 3]  # three steps, then the final validation
    timing = ("elapsed_s", "tokens_per_sec", "tokens_per_sec_per_device", "mfu")
    for run in (losses([str(tmp_path / "shards")], "dir"), losses([str(tmp_path / "shards" / "part-*")], "glob")):
        assert [{k: v for k, v in r.items() if k not in timing} for r in run] == \
            [{k: v for k, v in r.items() if k not in timing} for r in expected]


# --- the token cache ------------------------------------------------------------------------------------

def cache_bytes(tokenizer, data_path, path, **kwargs):
    build_token_cache(PretrainDataset(data_path, tokenizer, 32), str(path), **kwargs)
    with open(path, "rb") as f:
        return f.read()


def test_token_cache_is_the_token_stream_whatever_the_workers(tokenizer, tmp_path, pretrain_records, capsys):
    shards = write_shards(tmp_path / "shards", pretrain_records)
    streaming = PretrainDataset(shards, tokenizer, 32)
    stream = np.concatenate(list(streaming._documents())).astype(np.uint16).tobytes()
    one = cache_bytes(tokenizer, shards, tmp_path / "one.bin", num_workers=1, chunk_rows=16)
    two = cache_bytes(tokenizer, shards, tmp_path / "two.bin", num_workers=2, chunk_rows=16)
    three = cache_bytes(tokenizer, shards, tmp_path / "three.bin", num_workers=3, chunk_rows=7)
    assert one == two == three == stream
    printed = capsys.readouterr().out
    assert "tokens" in printed and " MB" in printed and " s " in printed, printed
    # Built and up to date: nothing to do.
    assert not build_token_cache(PretrainDataset(shards, tokenizer, 32), str(tmp_path / "two.bin"), num_workers=2)


def logged_tokenize_chunk(rows, tokenize_chunk=token_cache._tokenize_chunk):
    """token_cache._tokenize_chunk that appends the chunk's first row index to the file $CHUNK_LOG (the workers
    are other processes; a module-level function, so that the pool can send it to them)."""
    with open(os.environ["CHUNK_LOG"], "a") as f:
        f.write(f"{rows[0][0]}\n")
    return tokenize_chunk(rows)


def test_an_interrupted_token_cache_build_continues(tokenizer, tmp_path, pretrain_records, monkeypatch, capsys):
    shards = write_shards(tmp_path / "shards", pretrain_records)
    expected = cache_bytes(tokenizer, shards, tmp_path / "whole.bin", num_workers=2, chunk_rows=16)
    path = str(tmp_path / "tokens.bin")
    read_rows = corpus.read_rows

    def interrupted(file):
        for n, item in enumerate(read_rows(file)):
            if file == shards[1] and n == 100:
                raise KeyboardInterrupt  # Ctrl-C while the main process reads the second shard
            yield item
    monkeypatch.setattr(corpus, "read_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_token_cache(PretrainDataset(shards, tokenizer, 32), path, num_workers=2, chunk_rows=16, save_every=2)
    assert not os.path.exists(path)
    with open(path + ".partial.json") as f:
        done = json.load(f)["index"]
    assert 0 < done < SHARD_ROWS[0] + 100

    # Continue: the chunks tokenized now (logged by the workers, forked with this patch) all come after.
    monkeypatch.setattr(corpus, "read_rows", read_rows)
    monkeypatch.setattr(token_cache, "_tokenize_chunk", logged_tokenize_chunk)
    log = tmp_path / "chunks.log"
    monkeypatch.setenv("CHUNK_LOG", str(log))
    capsys.readouterr()
    assert build_token_cache(PretrainDataset(shards, tokenizer, 32), path, num_workers=2, chunk_rows=16)
    assert f"from row {done}" in capsys.readouterr().out
    assert min(int(line) for line in log.read_text().split()) > done
    with open(path, "rb") as f:
        assert f.read() == expected
    assert not os.path.exists(path + ".partial") and not os.path.exists(path + ".partial.json")
