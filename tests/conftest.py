"""Shared fixtures: the shipped tokenizer, tiny model settings and small slices of the shipped data."""
import gzip
import itertools
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
TOKENIZER_DIR = os.path.join(REPO, "custom_tokenizer")
DATA_DIR = os.path.join(REPO, "data")

# A model small enough for a 2-core CPU: every test that trains uses these arguments.
TINY_MODEL_ARGS = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2",
                   "--max_seq_len", "64", "--tokenizer_path", TOKENIZER_DIR, "--device", "cpu"]


def tiny_config(vocab_size, **overrides):
    from model import ModelConfig
    settings = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, max_seq_len=128)
    settings.update(overrides)
    return ModelConfig(**settings)


def write_jsonl(path, records):
    """Write records (dicts, or raw strings/bytes written as they are) one per line."""
    with open(path, "wb") as f:
        for record in records:
            if isinstance(record, dict):
                record = json.dumps(record, ensure_ascii=False)
            f.write((record if isinstance(record, bytes) else record.encode("utf-8")) + b"\n")
    return str(path)


def shipped_lines(name, count):
    with gzip.open(os.path.join(DATA_DIR, name), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in itertools.islice(f, count)]


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture
def pretrain_file(tmp_path):
    return write_jsonl(tmp_path / "pretrain.jsonl", shipped_lines("pretrain_poetry.jsonl.gz", 400))


@pytest.fixture
def sft_file(tmp_path):
    return write_jsonl(tmp_path / "sft_small.jsonl", shipped_lines("sft_poetry.jsonl.gz", 400))


@pytest.fixture
def belle_file(tmp_path):
    return write_jsonl(tmp_path / "sft_belle.jsonl", shipped_lines("sft_poetry_belle.jsonl.gz", 200))
