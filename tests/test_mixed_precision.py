"""Mixed precision: bf16 autocast (what --dtype auto picks on CPUs with bf16 units and on recent GPUs),
fp16 autocast with GradScaler (older GPUs), exact resume under both, and --dtype auto's choice for each
kind of CPU and GPU. (FSDP2 with bf16 parameters is in test_distributed.py; generation under autocast in
test_model.py.)

The runs pass --dtype explicitly, which a CPU honours whether or not it has bf16 units (emulated ones give
the same numbers, slower), so these tests pass on every CPU. CPU autocast executes the same code as CUDA's
(the loss in float32, the scaler's unscale and inf checks, its state in checkpoints); only the kernels
differ. No GPU checks these in CI, so these tests do.
"""
import math
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

import checkpoints
import train_model
from conftest import TINY_MODEL_ARGS, ForwardSpy, nan_loss_at, read_metrics, run_main, saved_weights, step_losses

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Every step logged and a learning rate at which each update shows in the losses. AdamW, with which the
# tolerances below were measured (Muon orthogonalises in bf16 whatever the run's dtype).
ARGS = [*TINY_MODEL_ARGS, "--batch_size", "4", "--log_interval", "1", "--eval_interval", "1000",
        "--eval_batches", "2", "--optimizer", "adamw", "--lr_schedule", "cosine", "--learning_rate", "1e-2",
        "--warmup_iters", "2", "--max_steps", "4", "--save_interval", "2"]


def val_loss(out):
    return [r["val_loss"] for r in read_metrics(out) if "val_loss" in r][-1]


@pytest.fixture(scope="module")
def float32_run(tmp_path_factory):
    from conftest import shipped_lines, write_jsonl
    base = tmp_path_factory.mktemp("float32")
    data = write_jsonl(base / "pretrain.jsonl", shipped_lines("pretrain_poetry.jsonl.gz", 400))
    out = str(base / "out")
    assert run_main(["--data_path", data, "--out_dir", out, *ARGS]) is None
    return data, out


def train_in(dtype, data, out, monkeypatch, *extra):
    autocasts = []
    real_autocast = torch.autocast

    def spy(*args, **kwargs):
        autocasts.append(kwargs.get("dtype"))
        return real_autocast(*args, **kwargs)
    monkeypatch.setattr(torch, "autocast", spy)
    assert run_main(["--data_path", data, "--out_dir", out, *ARGS, "--dtype", str(dtype).split(".")[1], *extra]) is None
    assert autocasts == [dtype], f"training ran autocast {autocasts}, not once in {dtype}"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HALF))
def test_mixed_precision_trains_like_float32(name, float32_run, tmp_path, monkeypatch, capsys):
    """4 steps in bf16 (fp16 + GradScaler) autocast: the losses and the validation loss of the float32 run
    within bf16's (fp16's) rounding, and a float32 checkpoint with the scaler's state."""
    data, reference = float32_run
    out = str(tmp_path / name)
    train_in(HALF[name], data, out, monkeypatch)
    assert str(HALF[name]) in capsys.readouterr().out  # the start-up line names the dtype
    expected, got = step_losses(reference), step_losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    # Measured: bf16 within 1.9e-3 of float32, fp16 within 1.1e-3 (8 and 11 bits of mantissa).
    tolerance = 5e-3 if name == "bf16" else 3e-3
    for step in got:
        assert got[step] == pytest.approx(expected[step], abs=tolerance), (step, got, expected)
    assert val_loss(out) == pytest.approx(val_loss(reference), abs=tolerance)
    assert got != expected  # half precision did run: the losses are not bit-identical
    assert all(w.dtype == torch.float32 for w in saved_weights(out).values())
    state = torch.load(os.path.join(out, "checkpoint-2", checkpoints.STATE_FILE), weights_only=False)
    if name == "fp16":
        assert state["scaler"]["scale"] > 0 and "_growth_tracker" in state["scaler"]
    else:
        assert not state["scaler"]  # bf16 needs no loss scaling


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HALF))
def test_resume_under_mixed_precision_equals_the_uninterrupted_run(name, float32_run, tmp_path, monkeypatch):
    """Resume from checkpoint-2 redoes steps 3 and 4 exactly: with fp16 the GradScaler's scale and growth
    tracker come back too (a scaler restarting at its initial scale skips different steps)."""
    data, _ = float32_run
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    train_in(HALF[name], data, full, monkeypatch)
    shutil.copytree(full, resumed)
    train_in(HALF[name], data, resumed, monkeypatch, "--resume", os.path.join(resumed, "checkpoint-2"))
    assert step_losses(resumed) == pytest.approx(step_losses(full), abs=1e-6)
    expected = saved_weights(full)
    for key, tensor in saved_weights(resumed).items():
        torch.testing.assert_close(tensor, expected[key], atol=1e-6, rtol=0, msg=key)


def simulate_gpu(monkeypatch, major, emulates_bf16):
    """torch.cuda as it answers on a GPU of compute capability `major`.x (T4: 7, A100: 8, H100: 9)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major, minor=0))
    # On a T4 a bf16 tensor can be made (emulated bf16): the check torch falls back to by default.
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: emulates_bf16)
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.mark.parametrize("major,expected", [(7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)],
                         ids=["T4-V100", "A100", "H100-H200"])
def test_dtype_auto_takes_native_bf16_else_float16(monkeypatch, major, expected):
    simulate_gpu(monkeypatch, major, emulates_bf16=True)
    args = train_model.parse_args(["--device", "cuda", "--dtype", "auto"])
    assert train_model.resolve_device_and_dtype(args)[:2] == (torch.device("cuda"), expected)
    assert train_model.make_grad_scaler(torch.device("cuda"), expected).is_enabled() == (expected == torch.float16)
    # An explicit choice is kept, even where it is slow.
    args = train_model.parse_args(["--device", "cuda", "--dtype", "bfloat16"])
    assert train_model.resolve_device_and_dtype(args)[1] == torch.bfloat16


@pytest.mark.slow
def test_float16_run_goes_on_after_a_non_finite_step(float32_run, tmp_path, monkeypatch, capsys):
    """float16 turns the loss scaler on (on CPU too, forced here as on a T4 or V100). A step whose loss is
    NaN is skipped and the run goes on: after the skipped step's unscale_ the scaler must be updated, or
    the next step's unscale_ raises "unscale_() has already been called on this optimizer"."""
    data, _ = float32_run
    out = str(tmp_path / "fp16")
    ForwardSpy(monkeypatch, nan_loss_at({2}))
    train_in(torch.float16, data, out, monkeypatch)
    assert "step 2: non-finite loss" in capsys.readouterr().out
    got = step_losses(out)
    assert sorted(got) == [1, 2, 3, 4] and math.isnan(got[2])
    assert all(math.isfinite(got[step]) for step in (1, 3, 4))
    assert not torch.equal(saved_weights(os.path.join(out, "checkpoint-2"))["model.norm.weight"],
                           saved_weights(out)["model.norm.weight"])  # steps 3 and 4 trained


@pytest.mark.parametrize("units,job,expected", [
    ("AMX", "train", torch.bfloat16), ("AVX512-BF16", "train", torch.bfloat16), (None, "train", torch.float32),
    ("AMX", "decode", torch.float32), (None, "decode", torch.float32)])
def test_dtype_auto_on_cpu_follows_its_bf16_units(monkeypatch, units, job, expected):
    import hardware
    monkeypatch.setattr(hardware, "cpu_bf16_units", lambda: units)
    dtype, why = hardware.choose_dtype(torch.device("cpu"), "auto", job)
    assert dtype == expected and why.startswith("auto:") and (units is None or units in why), why
    if job == "train":
        args = train_model.parse_args(["--device", "cpu"])
        assert train_model.resolve_device_and_dtype(args) == (torch.device("cpu"), expected, why)


@pytest.mark.parametrize("units", ["AMX", None])
def test_explicit_bfloat16_on_cpu_is_honoured_and_emulation_is_named(monkeypatch, capsys, units):
    import hardware
    monkeypatch.setattr(hardware, "cpu_bf16_units", lambda: units)
    args = train_model.parse_args(["--device", "cpu", "--dtype", "bfloat16"])
    device, dtype, why = train_model.resolve_device_and_dtype(args)
    assert dtype == torch.bfloat16
    warned = "bfloat16 on this CPU is emulated, several times slower" in capsys.readouterr().err
    assert warned == (units is None) and ("emulated" in why) == (units is None), why


@pytest.fixture(scope="module")
def chat_runs(tmp_path_factory, base_model):
    """SFT and DPO files of the shipped data, and an SFT model to start DPO from."""
    from conftest import preference_pairs, shipped_lines, write_jsonl
    base = tmp_path_factory.mktemp("chat")
    sft = write_jsonl(base / "sft.jsonl", shipped_lines("sft_poetry.jsonl.gz", 300))
    dpo = write_jsonl(base / "dpo.jsonl", preference_pairs(300))
    return {"sft": (sft, base_model), "dpo": (dpo, base_model)}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sft", "dpo"])
def test_bf16_fine_tuning_tracks_float32(mode, chat_runs, tmp_path, monkeypatch):
    """SFT and DPO under bf16 autocast: the losses of the float32 run within bf16's rounding over the first
    steps (pretraining: test_mixed_precision_trains_like_float32)."""
    data, init_from = chat_runs[mode]
    extra = ["--mode", mode, "--init_from", init_from]
    reference, out = str(tmp_path / "float32"), str(tmp_path / "bf16")
    assert run_main(["--data_path", data, "--out_dir", reference, *ARGS, *extra]) is None
    train_in(torch.bfloat16, data, out, monkeypatch, *extra)
    expected, got = step_losses(reference), step_losses(out)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step in got:  # bf16 keeps 8 bits of mantissa; measured: DPO within 2.8e-3 at step 4
        assert got[step] == pytest.approx(expected[step], abs=5e-3), (step, got, expected)
    assert got != expected
