"""train_model.py: the LR schedule, token-weighted accumulation, AMP and optimizer set-up, and end-to-end
pretraining and SFT runs of the tiny model whose output generate.py then reads."""
import argparse
import json
import math
import os
import signal

import pytest
import torch

from conftest import TINY_MODEL_ARGS, TOKENIZER_DIR, read_metrics, shipped_lines, tiny_config, write_jsonl
from model import Transformer

# --- the learning-rate schedule ------------------------------------------------------------------------

def test_get_lr_warmup_is_linear():
    from recipes import get_lr
    lr, warmup, max_steps = 3e-4, 10, 100
    values = [get_lr(step, lr, warmup, max_steps) for step in range(warmup)]
    assert values[0] == pytest.approx(lr / warmup)
    assert values[-1] == pytest.approx(lr)  # the peak is reached at step warmup - 1
    for step, value in enumerate(values):
        assert value == pytest.approx(lr * (step + 1) / warmup)
    assert max(get_lr(s, lr, warmup, max_steps) for s in range(max_steps + 10)) == pytest.approx(lr)


def test_get_lr_cosine_decay_and_floor():
    from recipes import get_lr
    lr, warmup, max_steps = 3e-4, 10, 110
    decay = [get_lr(step, lr, warmup, max_steps) for step in range(warmup, max_steps + 1)]
    assert decay[0] == pytest.approx(lr)
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing down to max_steps
    midpoint = warmup + (max_steps - warmup) // 2
    assert get_lr(midpoint, lr, warmup, max_steps) == pytest.approx((lr + lr / 10) / 2)
    for step in (max_steps, max_steps + 1, 10 * max_steps):
        assert get_lr(step, lr, warmup, max_steps) == pytest.approx(lr / 10)
    # Cosine shape: a quarter of the way the LR has lost (1 - cos(pi/4)) / 2 of its range.
    quarter = warmup + (max_steps - warmup) // 4
    expected = lr / 10 + (lr - lr / 10) * (1 + math.cos(math.pi / 4)) / 2
    assert get_lr(quarter, lr, warmup, max_steps) == pytest.approx(expected)


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_holds_the_peak_then_cools_down_over_the_last_fraction(shape):
    from recipes import get_lr
    lr, warmup, max_steps = 1e-3, 10, 100  # decay_fraction 0.2: the last 20 steps, 80 to 99
    values = [get_lr(s, lr, warmup, max_steps, "wsd", 0.2, shape) for s in range(max_steps + 5)]
    assert values[:warmup] == pytest.approx([lr * (s + 1) / warmup for s in range(warmup)])
    assert values[warmup - 1:81] == pytest.approx([lr] * (82 - warmup))  # stable through step 80
    cool = values[80:100]
    assert all(a > b for a, b in zip(cool, cool[1:])) and cool[-1] > 0  # the last step still learns
    assert values[100:] == [0.0] * 5
    expected_mid = lr * (1 - 0.5 if shape == "linear" else 1 - math.sqrt(0.5))
    assert values[90] == pytest.approx(expected_mid)  # halfway through the cool-down
    # The stable phase does not depend on the run's length: a longer run continues it.
    assert get_lr(80, lr, warmup, 200, "wsd", 0.2, shape) == lr


def test_get_lr_without_warmup_and_with_short_runs():
    from recipes import get_lr
    assert get_lr(0, 1e-3, 0, 50) == pytest.approx(1e-3)
    # A run shorter than its warmup never leaves the warmup, and never exceeds the peak.
    assert [get_lr(s, 1e-3, 100, 6) for s in range(6)] == pytest.approx([1e-5 * (s + 1) for s in range(6)])


# --- token-weighted gradient accumulation --------------------------------------------------------------

def _micro_batches(vocab_size):
    """Three SFT-like micro-batches of different widths and very different numbers of labelled tokens."""
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 20), (1, 30), (3, 12)]
    labelled = [[(12, 20), (15, 20)], [(3, 30)], [(10, 12), (11, 12), (9, 11)]]
    batches = []
    for (rows, width), spans in zip(shapes, labelled):
        ids = torch.randint(4, vocab_size, (rows, width), generator=g)
        labels = torch.full_like(ids, -100)
        for row, (start, end) in enumerate(spans):
            labels[row, start:end] = ids[row, start:end]
        if rows > 1:  # right padding in one row, as collate makes it
            ids[-1, spans[-1][1]:] = 3
        batches.append((ids, labels))
    return batches


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_token_weighted_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    model = Transformer(tiny_config(300, max_seq_len=32))
    batches = _micro_batches(300)
    counts = [int((labels[:, 1:] != -100).sum()) for _, labels in batches]
    assert len(set(counts)) == 3 and max(counts) > 5 * min(counts)
    total = sum(counts)

    model.zero_grad()
    for ids, labels in batches:
        model(ids, labels=labels, num_items_in_batch=total).loss.backward()
    accumulated = _grads(model)

    # The union: one batch, padded to the widest micro-batch, with the plain mean loss.
    width = max(ids.shape[1] for ids, _ in batches)
    union_ids = torch.cat([torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=3) for ids, _ in batches])
    union_labels = torch.cat([torch.nn.functional.pad(labels, (0, width - labels.shape[1]), value=-100)
                              for _, labels in batches])
    model.zero_grad()
    model(union_ids, labels=union_labels).loss.backward()
    union = _grads(model)
    torch.testing.assert_close(accumulated, union, atol=1e-5, rtol=1e-4)

    # The trap: averaging each micro-batch's own mean weights a token of a short batch more.
    model.zero_grad()
    for ids, labels in batches:
        (model(ids, labels=labels).loss / len(batches)).backward()
    naive = _grads(model)
    assert (naive - union).norm() > 0.05 * union.norm()


def test_training_loop_weights_tokens_over_the_step(tmp_path, monkeypatch):
    """train_model passes the step's labelled-token count (labels shifted by one) as num_items_in_batch."""
    import train_model
    seen = []
    original = Transformer.forward

    def spy(self, input_ids, labels=None, num_items_in_batch=None):
        if labels is not None and self.training:
            seen.append((int((labels[:, 1:] != -100).sum()), num_items_in_batch))
        return original(self, input_ids, labels=labels, num_items_in_batch=num_items_in_batch)

    monkeypatch.setattr(Transformer, "forward", spy)
    data = write_jsonl(tmp_path / "sft_data.jsonl", shipped_lines("sft_poetry.jsonl.gz", 300))
    train_model.main([*TINY_MODEL_ARGS, "--data_path", data, "--out_dir", str(tmp_path / "out"),
                      "--max_steps", "2", "--batch_size", "2", "--accumulation_steps", "3",
                      "--eval_interval", "100", "--eval_batches", "1", "--save_interval", "0"])
    assert len(seen) == 6
    for step in (seen[:3], seen[3:]):
        total = sum(count for count, _ in step)
        assert all(n == total for _, n in step)


# --- AMP and the optimizer ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,enabled", [(torch.bfloat16, False), (torch.float32, False),
                                           (torch.float16, True)])
def test_grad_scaler_only_for_float16(dtype, enabled):
    from train_model import make_grad_scaler
    assert make_grad_scaler(torch.device("cpu"), dtype).is_enabled() is enabled


def test_optimizer_groups_decay_matrices_only():
    from recipes import Recipe, make_optimizers
    model = Transformer(tiny_config(300))
    args = argparse.Namespace(learning_rate=1e-3, weight_decay=0.1)
    (optimizer,) = make_optimizers(model, args, Recipe("adamw", "cosine", 8e-3), torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW)
    by_decay = {}
    for group in optimizer.param_groups:
        by_decay.setdefault(group["weight_decay"], []).extend(group["params"])
    assert set(by_decay) == {0.0, 0.1}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in by_decay[0.0]}
    decay = {names[id(p)] for p in by_decay[0.1]}
    assert no_decay == {n for n, p in model.named_parameters() if "norm" in n}
    assert all(n.endswith(("norm.weight",)) for n in no_decay) and len(no_decay) == 2 * 2 + 1
    assert "tok_embeddings.weight" in decay and "layers.0.attention.wq.weight" in decay
    assert "layers.1.feed_forward.w2.weight" in decay
    # Every parameter exactly once (the tied lm_head is the embedding, not a second copy).
    all_params = by_decay[0.0] + by_decay[0.1]
    assert len(all_params) == len({id(p) for p in all_params}) == len(list(model.parameters()))



def test_muon_gets_the_block_matrices_and_adamw_the_rest():
    """Muon orthogonalises 2-D updates: the attention and MLP projections. The embedding (tied to the
    output head, a lookup table rather than a linear map of the residual) and the norms stay on AdamW.
    Every parameter is in exactly one group of one optimizer."""
    from recipes import Recipe, make_optimizers
    model = Transformer(tiny_config(300))
    args = argparse.Namespace(learning_rate=1e-3, weight_decay=0.1)
    muon, adamw = make_optimizers(model, args, Recipe("muon", "wsd", 8e-3), torch.device("cpu"))
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = [names[id(p)] for g in muon.param_groups for p in g["params"]]
    on_adamw = [names[id(p)] for g in adamw.param_groups for p in g["params"]]
    expected = {f"layers.{i}.{m}.weight" for i in range(2) for m in
                ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
    assert sorted(on_muon) == sorted(expected)
    assert sorted(on_adamw) == sorted(set(names.values()) - expected)
    assert "tok_embeddings.weight" in on_adamw and not any("norm" in n for n in on_muon)
    assert len(on_muon) + len(on_adamw) == len(set(on_muon + on_adamw)) == len(list(model.parameters()))
    assert muon.param_groups[0]["lr"] == 8e-3 and muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"


@pytest.mark.parametrize("argv,recipe", [
    ([], ("muon", "wsd")),  # pretraining from scratch
    (["--init_from", "some/model"], ("adamw", "cosine")),  # fine-tuning: SFT, DPO, LoRA
    (["--fsdp"], ("adamw", "cosine")),  # Muon needs whole matrices
    (["--optimizer", "adamw"], ("adamw", "cosine")),
    (["--optimizer", "muon", "--init_from", "some/model"], ("muon", "wsd")),
    (["--optimizer", "muon", "--lr_schedule", "cosine"], ("muon", "cosine")),
    (["--lr_schedule", "cosine"], ("muon", "cosine")),
])
def test_auto_recipe_is_muon_wsd_from_scratch_and_adamw_cosine_otherwise(argv, recipe):
    from recipes import choose_recipe
    from train_model import parse_args
    args = parse_args(argv)
    given = dict(vars(args))
    chosen = choose_recipe(args)
    assert (chosen.optimizer, chosen.lr_schedule, chosen.muon_learning_rate) == (*recipe, 8e-3)
    assert vars(args) == given  # the arguments stay as the user gave them


@pytest.mark.parametrize("saved,recipe", [
    ({"optimizer": "adamw", "lr_schedule": "cosine", "learning_rate": 1e-3}, ("adamw", "cosine", 8e-3)),
    ({"optimizer": "muon", "lr_schedule": "cosine", "muon_learning_rate": 2e-2, "learning_rate": 1e-3},
     ("muon", "cosine", 2e-2)),
    # Versions before the Muon LR had a default saved None: Muon ran at --learning_rate.
    ({"optimizer": "muon", "lr_schedule": "wsd", "muon_learning_rate": None, "learning_rate": 1e-3},
     ("muon", "wsd", 1e-3)),
    ({"learning_rate": 1e-3}, ("adamw", "cosine", 8e-3)),  # a checkpoint from before Muon and WSD existed
])
def test_auto_recipe_of_a_resumed_run_is_its_checkpoints(saved, recipe):
    from recipes import choose_recipe
    from train_model import parse_args
    chosen = choose_recipe(parse_args([]), "out/checkpoint-2", saved)
    assert (chosen.optimizer, chosen.lr_schedule, chosen.muon_learning_rate) == recipe
    chosen = choose_recipe(parse_args(["--muon_learning_rate", "5e-3", "--lr_schedule", "wsd"]), "out/checkpoint-2",
                           saved)
    assert (chosen.lr_schedule, chosen.muon_learning_rate) == ("wsd", 5e-3)  # what is given wins


def test_resuming_with_another_optimizer_is_refused():
    from errors import Fatal
    from recipes import choose_recipe
    from train_model import parse_args
    with pytest.raises(Fatal, match="out/checkpoint-2 was trained with --optimizer adamw"):
        choose_recipe(parse_args(["--optimizer", "muon"]), "out/checkpoint-2", {"optimizer": "adamw"})
    with pytest.raises(Fatal, match="--fsdp"):
        choose_recipe(parse_args(["--optimizer", "muon", "--fsdp"]))


# --- end to end: pretraining --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    import train_model
    folder = tmp_path_factory.mktemp("pretrain")
    data = write_jsonl(folder / "pretrain.jsonl", shipped_lines("pretrain_poetry.jsonl.gz", 400))
    out = str(folder / "out")
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        train_model.main([*TINY_MODEL_ARGS, "--data_path", data, "--out_dir", out, "--max_steps", "6",
                          "--batch_size", "4", "--log_interval", "2", "--eval_interval", "3",
                          "--eval_batches", "2", "--save_interval", "0"])
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    return out


def test_pretraining_writes_a_hugging_face_directory(pretrained):
    with open(os.path.join(pretrained, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] == 64 and config["num_hidden_layers"] == 2
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(pretrained, name)), name
    assert not [n for n in os.listdir(pretrained) if n.startswith("checkpoint-")]  # --save_interval 0


def test_pretrained_directory_loads_in_transformers(pretrained):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(pretrained).eval()
    assert type(hf) is LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    shipped = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    assert tokenizer.get_vocab() == shipped.get_vocab()
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.chat_template == shipped.chat_template
    generation = GenerationConfig.from_pretrained(pretrained)
    eos = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    assert set(eos) == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    assert generation.pad_token_id == tokenizer.pad_token_id
    ours = Transformer.from_pretrained(pretrained).eval()
    ids = torch.tensor([tokenizer("《静夜思》 李白\n床前明月光", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


def test_pretraining_metrics(pretrained):
    from recipes import get_lr
    records = read_metrics(pretrained)
    logs = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in logs] == [2, 4, 6]
    assert [r["step"] for r in evals] == [3, 6]
    for r in logs:
        assert {"step", "loss", "lr", "tokens", "tokens_per_sec"} <= set(r)
        assert math.isfinite(r["loss"]) and r["tokens_per_sec"] > 0
        # Every block of 64 tokens has 63 targets; 4 blocks a step.
        assert r["tokens"] == r["step"] * 4 * 63
        assert r["lr"] == pytest.approx(get_lr(r["step"] - 1, 3e-4, 100, 6))
    for r in evals:
        assert {"step", "val_loss", "val_ppl"} <= set(r)
        assert 0 < r["val_loss"] < 2 * math.log(6144)
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-5, abs=1e-3)


def test_token_cache_trains_exactly_like_streaming(pretrained, tmp_path):
    """--token_cache tokenizes once into a memmap; the run sees the same blocks, so the same losses."""
    import train_model
    data = os.path.join(os.path.dirname(pretrained), "pretrain.jsonl")
    cache, out = str(tmp_path / "tokens.bin"), str(tmp_path / "out")
    train_model.main([*TINY_MODEL_ARGS, "--data_path", data, "--out_dir", out, "--max_steps", "6",
                      "--batch_size", "4", "--log_interval", "2", "--eval_interval", "3",
                      "--eval_batches", "2", "--save_interval", "0", "--token_cache", cache])
    assert os.path.getsize(cache) > 0 and os.path.isfile(cache + ".json")
    assert [r.get("loss") for r in read_metrics(out)] == [r.get("loss") for r in read_metrics(pretrained)]


@pytest.mark.slow
def test_compiled_training_matches_eager(pretrained, tmp_path):
    """--compile (torch.compile of the model, forward and backward) trains the same run as eager: the
    same losses and validation to float tolerance, and a model directory that loads as usual."""
    import train_model
    from model import Transformer
    data = os.path.join(os.path.dirname(pretrained), "pretrain.jsonl")
    out = str(tmp_path / "out")
    train_model.main([*TINY_MODEL_ARGS, "--data_path", data, "--out_dir", out, "--max_steps", "6",
                      "--batch_size", "4", "--log_interval", "2", "--eval_interval", "3",
                      "--eval_batches", "2", "--save_interval", "0", "--compile"])
    compiled, eager = read_metrics(out), read_metrics(pretrained)
    assert [sorted(r) for r in compiled] == [sorted(r) for r in eager]
    for key in ("loss", "val_loss"):
        pairs = [(c[key], e[key]) for c, e in zip(compiled, eager) if key in e]
        assert pairs and all(c == pytest.approx(e, rel=1e-4) for c, e in pairs), (key, pairs)
    reloaded, trained = Transformer.from_pretrained(out), Transformer.from_pretrained(pretrained)
    for (name, a), b in zip(reloaded.state_dict().items(), trained.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


# --- end to end: SFT ----------------------------------------------------------------------------------

def test_training_mode_from_the_file_name(tmp_path):
    from train_model import parse_args, training_mode

    def mode(path, *extra):
        return training_mode(parse_args(["--data_path", str(path), *extra]))

    assert mode(tmp_path / "sft_small.jsonl") == "sft"
    assert mode(tmp_path / "data" / "My_SFT_Data.jsonl.gz") == "sft"
    assert mode(tmp_path / "pretrain.jsonl") == "pretrain"
    assert mode(tmp_path / "sft_runs" / "pretrain.jsonl") == "pretrain"  # the file's name, not the folder's
    assert mode(tmp_path / "sft_small.jsonl", "--mode", "pretrain") == "pretrain"
    assert mode(tmp_path / "pretrain.jsonl", "--mode", "sft") == "sft"


def test_sft_run_from_the_pretrained_model(pretrained, sft_file, tmp_path, monkeypatch, capsys):
    import modes
    import train_model
    from dataset import SFTDataset
    from safetensors.torch import load_file

    used = []

    class RecordingSFT(SFTDataset):
        def __init__(self, *args, **kwargs):
            used.append(kwargs.get("split"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(modes, "SFTDataset", RecordingSFT)
    out = str(tmp_path / "sft_out")
    # Learning rate 0: the weights written must be exactly those --init_from loaded.
    train_model.main([*TINY_MODEL_ARGS, "--data_path", sft_file, "--init_from", pretrained, "--out_dir", out,
                      "--max_steps", "2", "--batch_size", "4", "--log_interval", "1", "--eval_interval", "2",
                      "--eval_batches", "1", "--save_interval", "0", "--learning_rate", "0"])
    assert sorted(used) == ["train", "val"]
    assert "randomly initialised" not in capsys.readouterr().err
    before, after = load_file(os.path.join(pretrained, "model.safetensors")), \
        load_file(os.path.join(out, "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    logs = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in logs] == [1, 2]
    # Only assistant tokens count: far fewer than the 4 x 63 targets of packed pretraining blocks.
    assert all(0 < r["tokens"] - prev < 4 * 63 for r, prev in zip(logs, [0, logs[0]["tokens"]]))
    assert all(math.isfinite(r["loss"]) for r in logs)


def test_sft_without_init_from_warns(sft_file, tmp_path, capsys):
    import train_model
    train_model.main([*TINY_MODEL_ARGS, "--data_path", sft_file, "--out_dir", str(tmp_path / "o"),
                      "--max_steps", "1", "--batch_size", "2", "--eval_batches", "1", "--save_interval", "0"])
    assert "randomly initialised" in capsys.readouterr().err


@pytest.mark.parametrize("units,dtype,why", [("AMX", "bfloat16", "auto: the CPU has AMX bf16 units"),
                                             (None, "float32", "auto: the CPU has no bf16 units")])
def test_dtype_auto_on_cpu_trains_in_what_the_start_up_line_says(units, dtype, why, pretrain_file, tmp_path,
                                                                  monkeypatch, capsys):
    """--dtype auto on a CPU with bf16 units trains under bf16 autocast (without: float32, no autocast),
    and the start-up line says which and why. The runs are real: a CPU without the units emulates bf16."""
    import hardware
    import train_model
    monkeypatch.setattr(hardware, "cpu_bf16_units", lambda: units)
    autocasts = []
    real_autocast = torch.autocast

    def autocast_spy(*args, **kwargs):
        autocasts.append(kwargs.get("dtype"))
        return real_autocast(*args, **kwargs)

    monkeypatch.setattr(torch, "autocast", autocast_spy)
    out = str(tmp_path / "out")
    train_model.main([*TINY_MODEL_ARGS, "--data_path", pretrain_file, "--out_dir", out, "--max_steps", "2",
                      "--batch_size", "2", "--eval_batches", "1", "--save_interval", "0"])
    assert f"torch.{dtype} ({why})" in capsys.readouterr().out
    assert autocasts == ([torch.bfloat16] if units else [])
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


# --- generate.py ---------------------------------------------------------------------------------------

def _printed(tokenizer, new_ids):
    """What a streamer that holds back incomplete characters has printed once all ids have arrived."""
    for k in range(len(new_ids), -1, -1):
        text = tokenizer.decode(new_ids[:k], skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            return text


def _expected_completion(model_dir, prompt_ids, max_new_tokens, eos_token, dtype=torch.float32):
    """What generate.py should print: the greedy completion of the model converted to dtype."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = Transformer.from_pretrained(model_dir).eval().to(dtype)
    new = model.generate(torch.tensor([prompt_ids]), max_new_tokens, temperature=0,
                         eos_token_id=tokenizer.convert_tokens_to_ids(eos_token))[0, len(prompt_ids):].tolist()
    assert 0 < len(new) <= max_new_tokens
    return _printed(tokenizer, new)


@pytest.fixture
def generate_to_capsys(monkeypatch):
    """generate.py with its streamer writing to the sys.stdout of this test (see the test after these)."""
    import sys
    import generate

    class CurrentStdout:
        def write(self, text):
            return sys.stdout.write(text)

        def flush(self):
            sys.stdout.flush()

    monkeypatch.setattr(generate.TextStreamer.__init__, "__defaults__", (CurrentStdout(),))
    return generate


def test_generate_prints_only_the_new_text(pretrained, generate_to_capsys, capsys):
    from transformers import AutoTokenizer
    prompt = "《静夜思》 李白\n床前"
    generate_to_capsys.main(["--model", pretrained, "--prompt", prompt, "--max_new_tokens", "5",
                             "--temperature", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    ids = AutoTokenizer.from_pretrained(pretrained)(prompt, add_special_tokens=False)["input_ids"]
    assert out == _expected_completion(pretrained, ids, 5, "<|endoftext|>") + "\n"
    assert not out.startswith(prompt)


def test_generate_in_bf16_equals_the_model_converted_to_bf16(pretrained, generate_to_capsys, capsys):
    """--dtype bfloat16 decodes under autocast (float32 weights, bf16 matmuls): the tokens of the model
    converted to bf16, on any CPU (one without bf16 units emulates them)."""
    from transformers import AutoTokenizer
    prompt = "《静夜思》 李白\n床前"
    generate_to_capsys.main(["--model", pretrained, "--prompt", prompt, "--max_new_tokens", "8",
                             "--temperature", "0", "--device", "cpu", "--dtype", "bfloat16"])
    ids = AutoTokenizer.from_pretrained(pretrained)(prompt, add_special_tokens=False)["input_ids"]
    assert capsys.readouterr().out == _expected_completion(pretrained, ids, 8, "<|endoftext|>", torch.bfloat16) + "\n"


@pytest.mark.parametrize("compile_flag", [[], pytest.param(["--compile"], marks=pytest.mark.slow)],
                         ids=["eager", "compiled"])
def test_generate_chat_with_prompt(pretrained, generate_to_capsys, capsys, compile_flag):
    from transformers import AutoTokenizer
    question = "请背诵《静夜思》。"
    generate_to_capsys.main(["--model", pretrained, "--chat", "--prompt", question, "--max_new_tokens", "6",
                             "--temperature", "0", "--device", "cpu", *compile_flag])
    out = capsys.readouterr().out
    ids = AutoTokenizer.from_pretrained(pretrained)(
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert out == _expected_completion(pretrained, ids, 6, "<|im_end|>") + "\n"
    assert "<|im_start|>" not in out and question not in out


def test_generate_streams_to_the_current_stdout(pretrained):
    """Output redirected by the caller (contextlib.redirect_stdout, a notebook, a test) must receive the
    streamed text, not only the final newline: the streamer must look sys.stdout up when it writes."""
    import contextlib
    import io
    import generate
    from transformers import AutoTokenizer
    prompt = "春眠不觉晓"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        generate.main(["--model", pretrained, "--prompt", prompt, "--max_new_tokens", "4", "--temperature", "0",
                       "--device", "cpu"])
    ids = AutoTokenizer.from_pretrained(pretrained)(prompt, add_special_tokens=False)["input_ids"]
    assert buffer.getvalue() == _expected_completion(pretrained, ids, 4, "<|endoftext|>") + "\n"


def test_training_on_a_file_too_small_for_a_validation_line(tmp_path):
    """Fewer than 200 lines: no line is held out for validation. The run must still finish and save the
    model (skipping the evaluation), not die after training with "no valid sample (the file is empty)"."""
    import train_model
    data = write_jsonl(tmp_path / "pretrain.jsonl", shipped_lines("pretrain_poetry.jsonl.gz", 150))
    out = str(tmp_path / "out")
    try:
        train_model.main([*TINY_MODEL_ARGS, "--data_path", data, "--out_dir", out, "--max_steps", "2",
                          "--batch_size", "2", "--eval_batches", "1", "--save_interval", "0"])
    except SystemExit as e:
        pytest.fail(f"train_model exited with {e.code!r}")
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


def test_eos_check_asks_held_out_prompts_and_counts_answers_that_end(tokenizer, sft_file, monkeypatch):
    """--eos_check: prompts are validation conversations up to their last user turn; the rate is the share
    of answers containing <|im_end|>."""
    import argparse

    import generate
    from dataset import SFTDataset
    held_out = [m for _, (m, _) in SFTDataset(sft_file, tokenizer, 64, split="val").records()]
    prompts_seen = []

    def fake_complete(model, tok, prompt, args, stops, streamer=None):
        prompts_seen.append(tok.decode(prompt))
        return [5, tok.eos_token_id] if len(prompts_seen) % 2 else [5, 6]

    monkeypatch.setattr(generate, "complete", fake_complete)
    model = Transformer(tiny_config(len(tokenizer), max_seq_len=64))
    args = argparse.Namespace(max_new_tokens=10, temperature=0, top_k=None, top_p=None)
    rate, asked = generate.eos_rate(model, tokenizer, sft_file, args, {tokenizer.eos_token_id}, prompts=20)
    assert asked == len(held_out) == 2  # 400 lines, every 200th held out
    assert rate == 0.5
    for rendered, messages in zip(prompts_seen, held_out):
        last_answer = messages[-1]["content"]
        assert rendered.endswith("<|im_start|>assistant\n") and last_answer not in rendered
        assert messages[0]["content"] in rendered


# --- the schedule's length without --max_steps ------------------------------------------------------------

def run_to_the_end_of_the_data(tmp_path, monkeypatch, estimated_samples, *extra):
    """A pretraining run without --max_steps on 60 shipped documents, the data's length estimated as
    `estimated_samples` blocks (None: the real estimate): (metrics, console output)."""
    import modes
    import train_model
    if estimated_samples is not None:
        monkeypatch.setattr(modes, "estimate_samples_per_epoch", lambda dataset, report: estimated_samples)
    data = write_jsonl(tmp_path / "pretrain.jsonl", shipped_lines("pretrain_poetry.jsonl.gz", 60))
    out = str(tmp_path / "out")
    train_model.main([*TINY_MODEL_ARGS, "--data_path", data, "--out_dir", out, "--batch_size", "4",
                      "--warmup_iters", "2", "--log_interval", "1", "--eval_interval", "1000", "--eval_batches", "1",
                      "--save_interval", "0", *extra])
    return [r for r in read_metrics(out) if "loss" in r]


def blocks_in(tmp_path, tokenizer):
    """The training blocks of 64 tokens in the 60 documents, counted by reading them all."""
    from dataset import PretrainDataset
    return sum(1 for _ in PretrainDataset(str(tmp_path / "pretrain.jsonl"), tokenizer, 64))


def test_the_token_cache_counts_the_steps_exactly_and_the_cool_down_ends_with_the_data(tmp_path, monkeypatch,
                                                                                        capsys, tokenizer):
    steps = run_to_the_end_of_the_data(tmp_path, monkeypatch, 1_000_000, "--token_cache", str(tmp_path / "c.bin"))
    assert len(steps) == math.ceil(blocks_in(tmp_path, tokenizer) / 4)  # not the estimate: a million blocks
    printed = capsys.readouterr().out
    assert f"{len(steps)} steps, Muon" in printed and "warning" not in printed
    assert 0 < steps[-1]["lr"] < steps[-2]["lr"] < steps[len(steps) // 2]["lr"]  # cooled down to the last step


def test_a_wsd_run_stops_where_an_estimated_schedule_ends_and_says_so(tmp_path, monkeypatch, capsys, tokenizer):
    steps = run_to_the_end_of_the_data(tmp_path, monkeypatch, 12)  # 3 steps, fewer than the data has
    assert blocks_in(tmp_path, tokenizer) > 4 * 3
    assert [r["step"] for r in steps] == [1, 2, 3] and steps[-1]["lr"] > 0
    assert "the data outlasts the schedule's 3 steps; stopping: WSD's learning rate is 0" in capsys.readouterr().out


def test_a_cosine_run_goes_on_past_an_estimated_schedule_at_its_floor(tmp_path, monkeypatch, capsys, tokenizer):
    steps = run_to_the_end_of_the_data(tmp_path, monkeypatch, 12, "--optimizer", "adamw", "--lr_schedule", "cosine")
    assert len(steps) == math.ceil(blocks_in(tmp_path, tokenizer) / 4) > 3
    assert all(r["lr"] == pytest.approx(3e-5) for r in steps[3:])  # a tenth of the peak
    assert "going on at the schedule's floor learning rate" in capsys.readouterr().out


def test_a_run_whose_data_ends_before_an_estimated_schedule_says_so(tmp_path, monkeypatch, capsys, tokenizer):
    steps = run_to_the_end_of_the_data(tmp_path, monkeypatch, 4000)  # 1000 steps
    assert len(steps) == math.ceil(blocks_in(tmp_path, tokenizer) / 4)
    assert f"the data ended at step {len(steps)}, before the end of the schedule (1000 steps" in \
        capsys.readouterr().out


def test_mfu_counts_every_position_the_model_ran(tmp_path, monkeypatch, tokenizer):
    """MFU measures the hardware: the FLOPs of every position the model ran (a block of 64 positions has 63
    labelled tokens), over the device's matmul peak, replaced here by the model's FLOPs per token so that
    MFU reads as positions per second."""
    import logger
    import train_model
    flops_per_token = Transformer(tiny_config(len(tokenizer), max_seq_len=64)).flops_per_token(64)
    monkeypatch.setattr(logger, "measure_matmul_flops", lambda device, dtype: flops_per_token)
    data = write_jsonl(tmp_path / "pretrain.jsonl", shipped_lines("pretrain_poetry.jsonl.gz", 60))
    out = str(tmp_path / "out")
    train_model.main([*TINY_MODEL_ARGS, "--data_path", data, "--out_dir", out, "--batch_size", "4",
                      "--max_steps", "3", "--log_interval", "1", "--eval_interval", "1000", "--eval_batches", "1",
                      "--save_interval", "0"])
    logged = [r for r in read_metrics(out) if "loss" in r]
    assert len(logged) == 3
    for r in logged:
        assert r["mfu"] == pytest.approx(r["tokens_per_sec"] * 64 / 63, rel=1e-3)


@pytest.mark.parametrize("units,expected", [("AMX", torch.bfloat16), (None, torch.float32)])
def test_muon_runs_newton_schulz_in_bf16_only_where_the_cpu_has_bf16_units(units, expected, monkeypatch):
    """recipes.Muon in bf16 is torch.optim.Muon step for step (the same numbers); in float32, which a CPU
    without bf16 units gets (it would emulate bf16 17x slower), its updates stay within bf16's rounding."""
    import hardware
    from recipes import Muon, Recipe, make_optimizers
    monkeypatch.setattr(hardware, "cpu_bf16_units", lambda: units)
    args = argparse.Namespace(learning_rate=1e-3, weight_decay=0.1)
    muon, _ = make_optimizers(Transformer(tiny_config(300)), args, Recipe("muon", "wsd", 8e-3), torch.device("cpu"))
    assert isinstance(muon, Muon) and muon.ns_dtype == expected

    def train(optimizer_class, **kwargs):
        torch.manual_seed(0)
        weights = [torch.nn.Parameter(torch.randn(48, 32)), torch.nn.Parameter(torch.randn(16, 40))]
        optimizer = optimizer_class(weights, lr=2e-2, adjust_lr_fn="match_rms_adamw", **kwargs)
        for step in range(3):
            for w in weights:
                w.grad = torch.randn_like(w, generator=torch.Generator().manual_seed(step))
            optimizer.step()
        return weights

    for ours, torchs in zip(train(Muon, ns_dtype=torch.bfloat16), train(torch.optim.Muon)):
        assert torch.equal(ours, torchs)
    for ours, torchs in zip(train(Muon, ns_dtype=torch.float32), train(torch.optim.Muon)):
        assert not torch.equal(ours, torchs)
        torch.testing.assert_close(ours, torchs, atol=2e-3, rtol=0)


def test_fine_tuning_can_extend_the_context_of_the_init_from_model(sft_file, base_model, tmp_path, capsys):
    """--max_seq_len past the --init_from model's positions extends them (RoPE learns no positions): the
    model trains on the longer sequences and is written with the longer context, and where both have
    positions it is the same model (learning rate 0: nothing changed)."""
    import train_model
    out = tmp_path / "out"
    train_model.main([*TINY_MODEL_ARGS, "--data_path", sft_file, "--init_from", base_model, "--out_dir", str(out),
                      "--max_seq_len", "128", "--max_steps", "1", "--batch_size", "2", "--eval_batches", "1",
                      "--save_interval", "0", "--learning_rate", "0"])
    assert "has 64 positions; extending them to --max_seq_len 128" in capsys.readouterr().err
    longer, base = Transformer.from_pretrained(str(out)), Transformer.from_pretrained(base_model)
    assert longer.config.max_seq_len == 128 and base.config.max_seq_len == 64
    ids = torch.randint(300, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(longer(ids).logits, base(ids).logits)
        assert longer(torch.randint(300, (1, 128))).logits.shape == (1, 128, len(base.tok_embeddings.weight))
