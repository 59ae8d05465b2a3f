"""Shared fixtures and helpers: the shipped tokenizer, tiny model settings and models, small slices of the
shipped data, reading what a run wrote, and a served tiny model."""
import gzip
import itertools
import json
import os
import signal
import sys
import time

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


def write_tiny_model(path, tokenizer, seed=0, edit=None, **config):
    """A complete model directory as train_model.py writes it (weights, config, tokenizer, generation
    config) of the tiny architecture (tiny_config's settings with `config`'s overrides), initialised from
    `seed`; `edit(model)`, if given, changes the weights first."""
    from checkpoints import write_model_dir
    from model import Transformer
    torch.manual_seed(seed)
    model = Transformer(tiny_config(len(tokenizer), **config))
    if edit is not None:
        edit(model)
    write_model_dir(str(path), model.eval(), model.state_dict(), tokenizer)
    return str(path)


def train_until_learnt(model, batches, shortfall, max_steps, lr=5e-3):
    """Train `model` with AdamW on `batches` (token id tensors, each its own labels) until `shortfall(model)`,
    checked before every step, returns None; if max_steps do not suffice, fail with the last training loss
    and what shortfall returned. Returns the model in eval mode.

    Not a fixed number of steps: how many a model needs depends on the CPU's kernels, and a count that
    suffices on one CPU can leave the model short of it on another."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    batches, loss = iter(batches), None
    for step in range(max_steps + 1):
        model.eval()
        with torch.no_grad():
            missing = shortfall(model)
        if missing is None:
            return model
        if step == max_steps:
            break
        model.train()
        ids = next(batches)
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    pytest.fail(f"the model has not learnt what the test needs after {max_steps} steps (training loss "
                f"{loss.item():.4f} at the last): {missing}")


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


def read_metrics(out_dir):
    """The records of out_dir/metrics.jsonl, in order."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def step_losses(out_dir):
    """{step: loss} of metrics.jsonl, checking that no step's loss was logged twice."""
    records = [r for r in read_metrics(out_dir) if "loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step is logged twice in metrics.jsonl: {steps}"
    return {r["step"]: r["loss"] for r in records}


def saved_weights(path):
    """{name: tensor} of path/model.safetensors."""
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def run_main(argv, module="train_model"):
    """module.main(argv) in this process; the SystemExit code (an "error: ..." string) or None."""
    import importlib
    try:
        importlib.import_module(module).main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return None


def logged_steps(out_dir):
    """The training steps' rows of a run's metrics.jsonl, by step."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def run_and_resume(args, tmp_path, checkpoint):
    """Run train_model with args into tmp_path/full; copy it and resume the copy from `checkpoint` (a
    checkpoint directory's name) into tmp_path/resumed. The logged steps of both runs."""
    import shutil
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert run_main([*args, "--out_dir", full]) is None
    shutil.copytree(full, resumed)
    assert run_main([*args, "--out_dir", resumed, "--resume", resumed / checkpoint]) is None
    return logged_steps(full), logged_steps(resumed)


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


# --- a tiny model that has learnt a cycle of tokens (test_model.py, test_serve.py) ---------------------

CHAIN = 32  # tokens in the cycle


def _chain(vocab_size, seed=0):
    """A fixed random cycle through CHAIN tokens: each token's successor is the next one of the cycle."""
    pool = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))[:CHAIN].tolist()
    return pool, {t: pool[(i + 1) % CHAIN] for i, t in enumerate(pool)}


def successor_batches(vocab_size, batch=8, seq=32, seed=0):
    """Endless batches of sequences that follow the cycle, so the trained model has something to learn and
    greedy generation (from prompts on the cycle) is not one repeated token."""
    g = torch.Generator().manual_seed(seed)
    pool, successor = _chain(vocab_size)
    while True:
        rows = []
        for start in torch.randint(CHAIN, (batch,), generator=g).tolist():
            row = [pool[start]]
            for _ in range(seq - 1):
                row.append(successor[row[-1]])
            rows.append(row)
        ids = torch.tensor(rows)
        # Some noise, so that every token's embedding gets some gradient too.
        noise = torch.rand(ids.shape, generator=g) < 0.1
        yield torch.where(noise, torch.randint(vocab_size, ids.shape, generator=g), ids)


def chain_prompts(vocab_size, starts, length):
    """Prompts of `length` tokens along the training cycle, one per start position."""
    pool, _ = _chain(vocab_size)
    return torch.tensor([[pool[(s + i) % CHAIN] for i in range(length)] for s in starts])


def chain_shortfall(model):
    """None once every token of the cycle, in a clean run twice round it, has its successor as the most
    likely next token by a logit margin of 1 (greedy decoding then does not hinge on rounding, half
    precision included); else the smallest margin."""
    pool, _ = _chain(model.config.vocab_size)
    ids = torch.tensor([pool * 2 + pool[:1]])
    logits = model(ids).logits[0, :-1]
    targets = ids[0, 1:]
    right = logits.gather(1, targets[:, None])[:, 0]
    best_other = logits.scatter(1, targets[:, None], float("-inf")).max(-1).values
    margin = (right - best_other).min().item()
    return None if margin > 1 else f"the successor leads the other tokens by a logit margin of {margin:.3f} at worst"


def load_hf(model_dir):
    """model_dir in transformers' stock LlamaForCausalLM (no trust_remote_code), as an oracle that does
    not stop at an eos token of its own choosing (LlamaConfig has defaults)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.bos_token_id = None
    return hf


def hf_greedy(hf, ids, n):
    return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)


@pytest.fixture(scope="session")
def chain_model(tokenizer, tmp_path_factory):
    """(model, its save_pretrained directory, that directory in transformers): the tiny architecture
    trained until it has learnt the cycle. Tests must not change it."""
    from model import Transformer
    torch.manual_seed(1234)
    model = Transformer(tiny_config(len(tokenizer)))
    train_until_learnt(model, successor_batches(model.config.vocab_size), chain_shortfall, max_steps=300)
    model_dir = str(tmp_path_factory.mktemp("chain_model"))
    model.save_pretrained(model_dir)
    return model, model_dir, load_hf(model_dir)


# --- serve.py on a tiny model (test_serve.py, test_chat_page.py) ---------------------------------------

SYSTEM, QUESTION = "你是一个诗人。", "请背诵《静夜思》"


def write_chatty_model(path, tokenizer, max_seq_len, seed=0):
    """A tiny random model as train_model.py writes it. Its matrices are scaled up 8x: a fresh init repeats
    one token, while these weights give varied text, with large margins between the best tokens (greedy
    decoding does not hinge on rounding) and no end token within the first 1,000 tokens (checked)."""
    def scale_matrices(model):
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 2:
                    param.mul_(8)
    return write_tiny_model(path, tokenizer, seed=seed, edit=scale_matrices, max_seq_len=max_seq_len)


def running_server(model_dir, log_path, *args):
    """`python serve.py` on a free port of 127.0.0.1 (bench.py's way): yields (process, base URL)."""
    from benchmarks.serving import running_server as start
    return start(model_dir, log_path, "--device", "cpu", *args, env=SUBPROCESS_ENV)


def health(url):
    import httpx
    return httpx.get(f"{url}/health", timeout=10).json()


def when_idle(url):
    """/health once no request is running (waiting at most 30 s: a bound, not a speed test)."""
    deadline = time.monotonic() + 30
    while health(url)["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return health(url)
