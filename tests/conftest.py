"""Shared fixtures: the shipped tokenizer, tiny model settings and small slices of the shipped data."""
import gzip
import itertools
import json
import os
import signal
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
TOKENIZER_DIR = os.path.join(REPO, "custom_tokenizer")
DATA_DIR = os.path.join(REPO, "data")

# Tiny models gain nothing from a second thread; on a busy 2-core machine two threads mostly wait.
torch.set_num_threads(1)
SUBPROCESS_ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                  "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}

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


@pytest.fixture(scope="session")
def base_model(tmp_path_factory, tokenizer):
    """A model directory for --init_from: the tiny architecture with 64 positions, untrained."""
    from model import Transformer
    path = tmp_path_factory.mktemp("base") / "model"
    torch.manual_seed(0)
    Transformer(tiny_config(len(tokenizer), max_seq_len=64)).save_pretrained(str(path))
    return str(path)


@pytest.fixture
def pretrain_file(tmp_path):
    return write_jsonl(tmp_path / "pretrain.jsonl", shipped_lines("pretrain_poetry.jsonl.gz", 400))


@pytest.fixture
def sft_file(tmp_path):
    return write_jsonl(tmp_path / "sft_small.jsonl", shipped_lines("sft_poetry.jsonl.gz", 400))


def preference_pairs(count):
    """Preference pairs from shipped SFT lines, alternating the two formats: a question, its own answer
    (chosen) and the next line's (rejected)."""
    lines = shipped_lines("sft_poetry.jsonl.gz", count + 1)
    pairs = []
    for i, (line, other) in enumerate(zip(lines, lines[1:])):
        prompt, answer, wrong = line["messages"][:-1], line["messages"][-1], other["messages"][-1]
        if i % 2:
            pairs.append({"prompt": prompt[-1]["content"], "chosen": answer["content"], "rejected": wrong["content"]})
        else:
            pairs.append({"prompt": prompt, "chosen": [answer], "rejected": [wrong]})
    return pairs


@pytest.fixture
def dpo_file(tmp_path):
    return write_jsonl(tmp_path / "dpo_small.jsonl", preference_pairs(400))


@pytest.fixture
def belle_file(tmp_path):
    return write_jsonl(tmp_path / "sft_belle.jsonl", shipped_lines("sft_poetry_belle.jsonl.gz", 200))


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """train_model installs SIGINT/SIGTERM handlers; put pytest's back after each in-process run."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def run_main(argv, module="train_model"):
    """module.main(argv) in this process; the SystemExit code (an "error: ..." string) or None."""
    import importlib
    try:
        importlib.import_module(module).main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return None


class ForwardSpy:
    """Wraps Transformer.forward: counts training forwards and lets a test corrupt chosen ones.

    With --accumulation_steps 1, the n-th training forward of a run is its n-th step from the start.
    `corrupt(n, model, output)` may change output in place."""

    def __init__(self, monkeypatch, corrupt=None):
        from model import Transformer
        self.calls, self.corrupt = 0, corrupt
        original = Transformer.forward

        def forward(model, input_ids, labels=None, num_items_in_batch=None):
            out = original(model, input_ids, labels=labels, num_items_in_batch=num_items_in_batch)
            if model.training and torch.is_grad_enabled():  # not evaluations, nor DPO's reference
                self.calls += 1
                if self.corrupt is not None:
                    self.corrupt(self.calls, model, out)
            return out

        monkeypatch.setattr(Transformer, "forward", forward)


def nan_loss_at(steps):
    def corrupt(step, model, output):
        if step in steps:
            output.loss = output.loss * float("nan")
    return corrupt
