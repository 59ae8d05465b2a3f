"""Long runs: checkpoints, exact resume, stopping on signals, kill -9 during saves, non-finite steps, memory.

Everything trains the TINY_MODEL_ARGS model for a handful of steps. In-process `train_model.main([...])`
where possible; subprocesses where a signal or SIGKILL is involved. The memory tests build a 2 GB corpus
and take minutes: they run only with TINY_LLM_MEMORY_TESTS=1.
"""
import collections
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import (REPO, SUBPROCESS_ENV, TINY_MODEL_ARGS, ForwardSpy, nan_loss_at, read_metrics, run_main,
                      saved_weights, shipped_lines, step_losses, write_jsonl)

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Fast settings shared by every run: a tiny model, a learning rate large enough that every update shows in
# the losses, a log line per step and no evaluation but the final one.
FAST = [*TINY_MODEL_ARGS, "--batch_size", "4", "--log_interval", "1", "--eval_interval", "1000",
        "--eval_batches", "2", "--learning_rate", "1e-2", "--warmup_iters", "2"]

# --- helpers ---------------------------------------------------------------------------------------

def train_argv(data, out, *extra):
    return ["--data_path", data, "--out_dir", out, *FAST, *extra]


def checkpoint_dirs(out):
    """{step: path} of every checkpoint-N directory (temporary ones excluded), complete or not."""
    if not os.path.isdir(out):
        return {}
    return {int(m.group(1)): os.path.join(out, name) for name in os.listdir(out)
            if (m := CHECKPOINT.match(name)) and os.path.isdir(os.path.join(out, name))}


def load_checkpoint(path, step=None):
    """Load a checkpoint as a user would: Hugging Face model plus training state. Returns both."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()
    hf_model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    for name, tensor in hf_model.state_dict().items():
        assert torch.isfinite(tensor).all(), f"{path}: non-finite weights in {name}"
    state = torch.load(os.path.join(path, "training_state.pt"), weights_only=False, map_location="cpu")
    for key in ("optimizer", "scaler", "step", "samples_seen"):
        assert key in state, f"{path}/training_state.pt has no {key!r}"
    if step is not None:
        assert state["step"] == step, f"{path} holds step {state['step']}"
    return hf_model, state


def same_weights(a, b):
    wa, wb = saved_weights(a), saved_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


class InfiniteGradient(torch.autograd.Function):
    """Adds 0 to the loss, but sends an infinite gradient to its input: a finite loss, an inf grad norm."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sum() * 0

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.full_like(x, float("inf"))


# --- checkpoints -----------------------------------------------------------------------------------

def test_checkpoints_are_hf_model_dirs_and_only_the_newest_are_kept(tmp_path, pretrain_file):
    from transformers import AutoModelForCausalLM

    from model import Transformer
    out = tmp_path / "out"
    assert run_main(train_argv(pretrain_file, out, "--max_steps", "4", "--save_interval", "1")) is None

    # Default --save_total_limit 3: checkpoints 2, 3 and 4 remain, nothing temporary is left behind.
    assert sorted(checkpoint_dirs(out)) == [2, 3, 4]
    assert not [n for n in os.listdir(out) if "tmp" in n or "old" in n], os.listdir(out)
    for step, path in checkpoint_dirs(out).items():
        _, state = load_checkpoint(path, step)
        assert state["samples_seen"] == 4 * step
        assert state["optimizer"]["state"], "the optimizer state is empty"
    # A full model directory: Hugging Face computes what our model computes from it.
    hf_model, _ = load_checkpoint(out / "checkpoint-4")
    ours = Transformer.from_pretrained(str(out / "checkpoint-4")).eval()
    input_ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110]])
    with torch.no_grad():
        torch.testing.assert_close(hf_model.eval()(input_ids).logits, ours(input_ids).logits, atol=1e-4, rtol=1e-4)
    # The final model is in out_dir itself: loadable, and the weights of the last step.
    final = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert final.config.vocab_size == hf_model.config.vocab_size
    assert same_weights(out, out / "checkpoint-4")


# --- exact resume ----------------------------------------------------------------------------------

RESUME_CASES = {
    "pretrain": ("pretrain", []),
    "pretrain-workers": ("pretrain", ["--num_workers", "2"]),
    "pretrain-dropout": ("pretrain", ["--dropout", "0.1"]),
    "sft": ("sft", []),
    "sft-init_from-dropout": ("sft", ["--dropout", "0.1", "--init_from", "BASE"]),
    # The cases above pretrain with the defaults: Muon's momentum buffers and AdamW's moments, both in the
    # checkpoint, and WSD; here WSD cools down across the resume, and the seed's AdamW + cosine.
    "pretrain-wsd-cooldown": ("pretrain", ["--decay_fraction", "0.5"]),
    "pretrain-adamw-cosine": ("pretrain", ["--optimizer", "adamw", "--lr_schedule", "cosine"]),
    # The checkpoints hold the adapters and their optimizer state only; the base comes from --init_from.
    "sft-lora-dropout": ("sft", ["--init_from", "BASE", "--lora_rank", "4", "--lora_dropout", "0.1"]),
    "dpo": ("dpo", ["--init_from", "BASE"]),
    "dpo-lora": ("dpo", ["--init_from", "BASE", "--lora_rank", "4"]),
}
# The quick tier resumes the default pretraining run and DPO with LoRA (--init_from, adapters, a reference
# model); the other cases are slow.
QUICK_RESUME_CASES = {"pretrain", "dpo-lora"}


@pytest.mark.parametrize("case", [case if case in QUICK_RESUME_CASES else pytest.param(case, marks=pytest.mark.slow)
                                  for case in RESUME_CASES])
def test_resume_logs_the_losses_of_the_uninterrupted_run(case, tmp_path, pretrain_file, sft_file, dpo_file,
                                                         base_model, monkeypatch):
    kind, extra = RESUME_CASES[case]
    data = {"pretrain": pretrain_file, "sft": sft_file, "dpo": dpo_file}[kind]
    extra = [base_model if a == "BASE" else a for a in extra]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    argv = ["--max_steps", "4", "--save_interval", "2", *extra]
    assert run_main(train_argv(data, full, *argv)) is None
    reference = step_losses(full)
    assert sorted(reference) == [1, 2, 3, 4]

    # As after a crash at the end of step 4: checkpoints 2 and 4, metrics up to step 4. Resume from
    # checkpoint-2 (explicit path): steps 3 and 4 are redone, and only they.
    shutil.copytree(full, resumed)
    spy = ForwardSpy(monkeypatch)
    assert run_main(train_argv(data, resumed, *argv, "--resume", resumed / "checkpoint-2")) is None
    assert spy.calls == 2, f"the resumed run trained {spy.calls} steps, not steps 3 and 4"
    losses = step_losses(resumed)
    assert sorted(losses) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert losses[step] == pytest.approx(reference[step], abs=1.1e-6), \
            f"step {step}: resumed loss {losses[step]} != uninterrupted {reference[step]}"
    wa, wb = saved_weights(full), saved_weights(resumed)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=1e-5, rtol=0, msg=f"final weights differ: {name}")


def test_sft_init_from_applies_dropout(tmp_path, sft_file, base_model):
    """--dropout with --init_from must train with that dropout. The base model has dropout 0; with
    --init_from, the seed only drives dropout, so two seeds must give different losses."""
    runs = []
    for seed in ("1", "2"):
        out = tmp_path / f"seed{seed}"
        assert run_main(train_argv(sft_file, out, "--max_steps", "2", "--init_from", base_model,
                                   "--dropout", "0.1", "--seed", seed)) is None
        runs.append(step_losses(out))
    assert runs[0] != runs[1], "--dropout 0.1 has no effect on an --init_from model: same losses for two seeds"


def test_resume_auto_picks_the_newest_complete_checkpoint(tmp_path, pretrain_file, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = train_argv(pretrain_file, out, "--max_steps", "6", "--save_interval", "2", "--resume", "auto")
    # Nothing to resume: a fresh start, said so.
    assert run_main(argv) is None
    assert "no checkpoint" in capsys.readouterr().out
    reference = step_losses(out)

    # Lose checkpoint-6; leave debris that is not a complete checkpoint: a temporary directory and a
    # checkpoint-8 without training state. auto must take checkpoint-4.
    shutil.rmtree(out / "checkpoint-6")
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-7.tmp12345")
    os.makedirs(out / "checkpoint-8")
    shutil.copy(out / "checkpoint-4" / "config.json", out / "checkpoint-8")
    spy = ForwardSpy(monkeypatch)
    assert run_main(argv) is None
    assert re.search(r"resuming from \S*checkpoint-4\b", capsys.readouterr().out)
    assert spy.calls == 2
    losses = step_losses(out)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses == pytest.approx(reference, abs=1.1e-6)


def test_resuming_a_finished_run_logs_nothing_twice(tmp_path, pretrain_file, monkeypatch):
    """`--resume auto` run again after the run finished (a scheduler re-running the job): no step is
    trained again and metrics.jsonl gets no second record for any step."""
    out = tmp_path / "out"
    argv = train_argv(pretrain_file, out, "--max_steps", "4", "--save_interval", "2", "--resume", "auto")
    assert run_main(argv) is None
    before = read_metrics(out)
    spy = ForwardSpy(monkeypatch)
    assert run_main(argv) is None
    assert spy.calls == 0
    after = read_metrics(out)
    keys = collections.Counter((r["step"], tuple(sorted(r))) for r in after)
    duplicates = [f"step {step} {list(fields)}" for (step, fields), n in keys.items() if n > 1]
    assert not duplicates, f"metrics.jsonl has records twice after the resume: {duplicates}"
    assert [r["step"] for r in after] == [r["step"] for r in before]


# --- signals ---------------------------------------------------------------------------------------

def wait_for(condition, timeout, proc=None, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training exited ({proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def logged_steps(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        steps = [json.loads(line)["step"] for line in f if line.endswith("\n")]
    return max(steps, default=0)


def start_training(argv, **kwargs):
    return subprocess.Popen([sys.executable, "train_model.py", *[str(a) for a in argv]], cwd=REPO,
                            env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)


SIGNAL_STEPS = 12
SIGNAL_CASES = {"SIGINT": (signal.SIGINT, "0"), "SIGTERM": (signal.SIGTERM, "0"),
                "SIGINT-workers": (signal.SIGINT, "2"), "SIGTERM-workers": (signal.SIGTERM, "2")}


@pytest.fixture(scope="module")
def signal_runs(tmp_path_factory):
    """Every case of the signal test at once (the processes mostly wait on imports): start training,
    signal the process group once step 2 is logged, then run each printed resume command."""
    base = tmp_path_factory.mktemp("signals")
    data = write_jsonl(base / "pretrain.jsonl", shipped_lines("pretrain_poetry.jsonl.gz", 400))
    runs = {}
    try:
        for name, (signum, workers) in SIGNAL_CASES.items():
            out = base / name
            argv = train_argv(data, out, "--max_steps", SIGNAL_STEPS, "--batch_size", "2", "--save_interval", "0",
                              "--num_workers", workers)
            runs[name] = {"out": str(out), "signum": signum, "proc": start_training(argv), "signalled": False}
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not all(r["signalled"] or r["proc"].poll() is not None
                                                      for r in runs.values()):
            for r in runs.values():
                if not r["signalled"] and r["proc"].poll() is None and logged_steps(r["out"]) >= 2:
                    # Like Ctrl-C in a terminal or a scheduler's SIGTERM: the whole process group gets it.
                    os.killpg(r["proc"].pid, r["signum"])
                    r["signalled"] = True
            time.sleep(0.02)
        for r in runs.values():
            try:
                r["stdout"], r["stderr"] = r["proc"].communicate(timeout=180)
            except subprocess.TimeoutExpired:
                os.killpg(r["proc"].pid, signal.SIGKILL)
                r["stdout"], r["stderr"] = r["proc"].communicate()
            r["returncode"] = r["proc"].returncode
            r["commands"] = [line.split("resume with:", 1)[1].strip() for line in r["stdout"].splitlines()
                             if "resume with:" in line]
            r["checkpoints"] = checkpoint_dirs(r["out"])
            r["metrics_steps"] = sorted(step_losses(r["out"])) if os.path.exists(
                os.path.join(r["out"], "metrics.jsonl")) else []
        resumes = {name: subprocess.Popen(r["commands"][0], shell=True, cwd=REPO, env=SUBPROCESS_ENV,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          start_new_session=True)
                   for name, r in runs.items() if len(r["commands"]) == 1}
        for name, proc in resumes.items():
            try:
                out, err = proc.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
            runs[name]["resumed"] = subprocess.CompletedProcess(runs[name]["commands"][0], proc.returncode, out, err)
        yield runs
    finally:
        for r in runs.values():
            if r["proc"].poll() is None:
                os.killpg(r["proc"].pid, signal.SIGKILL)
                r["proc"].wait()


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SIGNAL_CASES))
def test_signal_saves_a_checkpoint_and_prints_a_working_resume_command(case, signal_runs):
    r = signal_runs[case]
    assert r["signalled"], f"training ended before step 2 ({r['returncode']}):\n{r['stderr'][-3000:]}"
    # 128 + the signal's number (130, 143), as shells expect: a job script must not carry on as if done.
    assert r["returncode"] == 128 + r["signum"], \
        f"exit code {r['returncode']}:\n{r['stdout'][-2000:]}\n{r['stderr'][-3000:]}"
    assert "Traceback" not in r["stderr"], r["stderr"]
    assert len(r["commands"]) == 1, f"no single 'resume with:' line:\n{r['stdout']}"
    assert len(r["checkpoints"]) == 1, r["checkpoints"]
    (stopped_at, path), = r["checkpoints"].items()
    assert 2 <= stopped_at < SIGNAL_STEPS
    load_checkpoint(path, stopped_at)
    # The current step was finished, then saved: the stopped run logged exactly steps 1..stopped_at.
    assert r["metrics_steps"] == list(range(1, stopped_at + 1))
    assert path in r["commands"][0]

    resumed = r["resumed"]
    assert resumed.returncode == 0, f"{resumed.args}\n{resumed.stdout[-2000:]}\n{resumed.stderr[-3000:]}"
    assert "done:" in resumed.stdout
    assert sorted(step_losses(r["out"])) == list(range(1, SIGNAL_STEPS + 1))


@pytest.mark.slow
def test_a_job_script_stops_after_a_signalled_run(tmp_path, pretrain_file):
    """train.sh runs its steps under `set -e`, as job scripts do: a training stopped by SIGTERM (sent to it
    alone, as `timeout` does) exits 143, so the script stops there instead of going on to its next step."""
    import psutil
    import shlex
    out = tmp_path / "out"
    argv = [str(a) for a in train_argv(pretrain_file, out, "--max_steps", "200", "--save_interval", "0")]
    script = f"set -euo pipefail\n{shlex.join([sys.executable, 'train_model.py', *argv])}\necho NEXT STEP\n"
    proc = subprocess.Popen(["bash", "-c", script], cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: logged_steps(out) >= 2, 300, proc, "step 2")
        training, = [p for p in psutil.Process(proc.pid).children() if "train_model.py" in p.cmdline()]
        training.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143, f"{proc.returncode}\n{stdout[-2000:]}\n{stderr[-3000:]}"
    assert "resume with:" in stdout and "NEXT STEP" not in stdout, stdout


def test_printed_resume_command_survives_the_shell(tmp_path, pretrain_file, monkeypatch, capsys):
    """The resume command is printed to be pasted into a shell: paths with spaces must stay one argument."""
    import shlex
    out = tmp_path / "my run"
    argv = [str(a) for a in train_argv(pretrain_file, out, "--max_steps", "10", "--save_interval", "0")]
    monkeypatch.setattr(sys, "argv", ["train_model.py", *argv])

    pytest_handler = signal.getsignal(signal.SIGTERM)

    def send_sigterm(step, model, output):
        # Only to train_model's own handler: SIGTERM must never reach pytest's default one.
        handler = signal.getsignal(signal.SIGTERM)
        if step == 2 and callable(handler) and handler is not pytest_handler:
            os.kill(os.getpid(), signal.SIGTERM)
    ForwardSpy(monkeypatch, send_sigterm)
    assert run_main(argv) == 128 + signal.SIGTERM
    line = [line for line in capsys.readouterr().out.splitlines() if "resume with:" in line][-1]
    tokens = shlex.split(line.split("resume with:", 1)[1])
    checkpoint, = checkpoint_dirs(out).values()
    assert "train_model.py" in tokens
    assert tokens[tokens.index("train_model.py") + 1:] == [*argv, "--resume", checkpoint]


# --- kill -9 in the middle of saves ----------------------------------------------------------------

def assert_every_checkpoint_loads(out):
    checkpoints = checkpoint_dirs(out)
    for step, path in checkpoints.items():
        try:
            load_checkpoint(path, step)
        except Exception as e:  # noqa: BLE001 - report which checkpoint and what it holds
            pytest.fail(f"{path} does not load after kill -9 ({type(e).__name__}: {e}); "
                        f"it holds {sorted(os.listdir(path))}")
    return checkpoints


@pytest.mark.slow
def test_kill_9_during_saves_leaves_every_checkpoint_loadable(tmp_path, pretrain_file):
    out = tmp_path / "out"
    argv = train_argv(pretrain_file, out, "--max_steps", "400", "--batch_size", "2", "--save_interval", "1",
                      "--resume", "auto")
    rng = random.Random(1234)
    # Where to kill: as soon as a save's temporary directory appears (mid-write), a random few ms after
    # (mid-write, fsync, rename or rotation), and at a random moment of training.
    moments = ["tmp", "tmp+random", "random", "tmp+random"]
    for moment in moments:
        newest_before = max(checkpoint_dirs(out), default=0)
        proc = start_training(argv)
        try:
            # Let this run write one checkpoint of its own first, so the kill hits a later save.
            wait_for(lambda: max(checkpoint_dirs(out), default=0) > newest_before, 120, proc, "a checkpoint")
            if moment == "random":
                time.sleep(rng.uniform(0, 0.5))
            else:
                seen = set(os.listdir(out))
                wait_for(lambda: any("tmp" in name for name in set(os.listdir(out)) - seen),
                         120, proc, "a checkpoint being written")
                if moment == "tmp+random":
                    time.sleep(rng.uniform(0, 0.05))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert assert_every_checkpoint_loads(out), "no complete checkpoint left"

    newest = max(checkpoint_dirs(out))
    finish = [a if a != "400" else str(newest + 2) for a in argv]
    done = subprocess.run([sys.executable, "train_model.py", *map(str, finish)], cwd=REPO, env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(rf"resuming from \S*checkpoint-{newest}\b", done.stdout), done.stdout[-2000:]
    assert sorted(step_losses(out)) == list(range(1, newest + 3))
    assert_every_checkpoint_loads(out)


@pytest.mark.slow
def test_kill_9_while_deleting_an_old_checkpoint(tmp_path, pretrain_file):
    """SIGKILL halfway through removing the oldest checkpoint (--save_total_limit): what remains under a
    checkpoint-N name must still be a complete checkpoint. tests/crash_during_save.py runs training and
    kills it once it has removed the first file of a complete checkpoint, whatever removes it."""
    out = tmp_path / "out"
    argv = train_argv(pretrain_file, out, "--max_steps", "4", "--batch_size", "2", "--save_interval", "1",
                      "--save_total_limit", "1")
    helper = os.path.join(os.path.dirname(__file__), "crash_during_save.py")
    proc = subprocess.run([sys.executable, helper, *map(str, argv)], cwd=REPO, env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=300)
    killed = re.search(r"^killed while deleting (.+)$", proc.stderr, re.MULTILINE)
    assert proc.returncode == -signal.SIGKILL and killed, \
        f"training was not killed while deleting a checkpoint (exit {proc.returncode}): with --save_total_limit 1, " \
        f"saving checkpoint-2 must delete checkpoint-1, and its files go through os.unlink or os.remove\n" + \
        proc.stderr[-3000:]
    assert os.path.basename(killed.group(1)).startswith("checkpoint-1"), killed.group(0)
    assert sorted(assert_every_checkpoint_loads(out)) == [2], "checkpoint-2 was lost"


# --- non-finite steps ------------------------------------------------------------------------------

def test_nan_loss_skips_the_update(tmp_path, pretrain_file, monkeypatch, capsys):
    out = tmp_path / "out"
    ForwardSpy(monkeypatch, nan_loss_at({3}))
    assert run_main(train_argv(pretrain_file, out, "--max_steps", "4", "--save_interval", "1",
                               "--save_total_limit", "10")) is None
    printed = capsys.readouterr()
    assert re.search(r"\bstep 3\b.*(non-finite|nan|NaN)", printed.out + printed.err), printed.out
    ckpt = {step: load_checkpoint(path, step) for step, path in checkpoint_dirs(out).items()}
    assert sorted(ckpt) == [1, 2, 3, 4]
    # Step 3 changed nothing: weights and optimizer state as after step 2. Step 4 trained again.
    assert same_weights(out / "checkpoint-2", out / "checkpoint-3")
    opt2, opt3 = ckpt[2][1]["optimizer"]["state"], ckpt[3][1]["optimizer"]["state"]
    for key in opt2:
        for name in opt2[key]:
            assert torch.equal(torch.as_tensor(opt2[key][name]), torch.as_tensor(opt3[key][name])), (key, name)
    assert not same_weights(out / "checkpoint-3", out / "checkpoint-4")
    assert not same_weights(out / "checkpoint-1", out / "checkpoint-2")


def test_infinite_gradient_norm_skips_the_update(tmp_path, pretrain_file, monkeypatch, capsys):
    def corrupt(step, model, output):
        if step == 2:
            output.loss = output.loss + InfiniteGradient.apply(model.norm.weight)
    out = tmp_path / "out"
    ForwardSpy(monkeypatch, corrupt)
    assert run_main(train_argv(pretrain_file, out, "--max_steps", "3", "--save_interval", "1")) is None
    printed = capsys.readouterr()
    assert re.search(r"\bstep 2\b.*(non-finite|inf)", printed.out + printed.err), printed.out
    assert math.isfinite(step_losses(out)[2])
    for step, path in checkpoint_dirs(out).items():
        load_checkpoint(path, step)
    assert same_weights(out / "checkpoint-1", out / "checkpoint-2")
    assert not same_weights(out / "checkpoint-2", out / "checkpoint-3")


def test_max_bad_steps_in_a_row_stops_the_run(tmp_path, pretrain_file, monkeypatch, capfd):
    out = tmp_path / "out"
    spy = ForwardSpy(monkeypatch, nan_loss_at(set(range(2, 100))))
    code = run_main(train_argv(pretrain_file, out, "--max_steps", "20", "--save_interval", "1",
                               "--save_total_limit", "20", "--max_bad_steps", "3"))
    assert isinstance(code, str) and code.startswith("error:") and "\n" not in code, code
    assert "3" in code and re.search(r"non-finite|nan|NaN", code), code
    assert "Traceback" not in capfd.readouterr().err
    assert spy.calls == 4, f"trained {spy.calls} steps; expected to stop at the third bad step in a row (4)"
    checkpoints = checkpoint_dirs(out)
    assert max(checkpoints) <= 4
    for step, path in checkpoints.items():
        load_checkpoint(path, step)  # finite weights
        assert same_weights(path, checkpoints[1])  # nothing after step 1 changed the weights


def test_default_max_bad_steps_is_ten(tmp_path, pretrain_file, monkeypatch):
    spy = ForwardSpy(monkeypatch, nan_loss_at(set(range(1, 100))))
    code = run_main(train_argv(pretrain_file, tmp_path / "out", "--max_steps", "30", "--save_interval", "0"))
    assert isinstance(code, str) and code.startswith("error:") and "10" in code, code
    assert spy.calls == 10


def test_bad_steps_not_in_a_row_do_not_stop_the_run(tmp_path, pretrain_file, monkeypatch):
    out = tmp_path / "out"
    ForwardSpy(monkeypatch, nan_loss_at({1, 3, 5, 7}))
    assert run_main(train_argv(pretrain_file, out, "--max_steps", "8", "--save_interval", "4",
                               "--max_bad_steps", "2")) is None
    for step, path in checkpoint_dirs(out).items():
        load_checkpoint(path, step)
    assert os.path.isfile(out / "model.safetensors")


# --- memory (TINY_LLM_MEMORY_TESTS=1) --------------------------------------------------------------

def memory_test(test):
    skip = pytest.mark.skipif(os.environ.get("TINY_LLM_MEMORY_TESTS") != "1",
                              reason="set TINY_LLM_MEMORY_TESTS=1: builds a 2 GB corpus, takes minutes")
    return pytest.mark.slow(skip(test))


def repeated_corpus(path, size):
    """A JSONL file of about `size` bytes: the shipped poetry lines, over and over."""
    import gzip
    with gzip.open(os.path.join(REPO, "data", "pretrain_poetry.jsonl.gz"), "rb") as f:
        block = f.read()
    with open(path, "wb") as f:
        for _ in range(max(1, math.ceil(size / len(block)))):
            f.write(block)
    return str(path)


def sharded_corpus(directory, size, shards=64, parquet_every=4):
    """About `size` bytes of the shipped poetry lines over and over, as `shards` files in `directory`: every
    `parquet_every`-th one Parquet (row groups of 4096 rows, the first file among them), the rest JSONL."""
    import gzip
    import pyarrow as pa
    import pyarrow.parquet as pq
    with gzip.open(os.path.join(REPO, "data", "pretrain_poetry.jsonl.gz"), "rb") as f:
        block = f.read()
    rows = [json.loads(line) for line in block.splitlines()]
    os.makedirs(directory)
    repeats = max(1, math.ceil(size / shards / len(block)))
    for shard in range(shards):
        if shard % parquet_every == 0:
            pq.write_table(pa.Table.from_pylist(rows * repeats), os.path.join(directory, f"part-{shard:03d}.parquet"),
                           row_group_size=4096)
        else:
            with open(os.path.join(directory, f"part-{shard:03d}.jsonl"), "wb") as f:
                for _ in range(repeats):
                    f.write(block)
    return str(directory)


def peak_tree_memory(cmd, timeout):
    """Run cmd; poll the process and all its descendants. Returns (result, peak RSS sum, peak PSS sum)."""
    import psutil
    proc = subprocess.Popen(cmd, cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    peak = {"rss": 0, "pss": 0}
    output = {}

    def drain(name, stream):
        output[name] = stream.read()
    readers = [threading.Thread(target=drain, args=(n, s)) for n, s in (("out", proc.stdout), ("err", proc.stderr))]
    for t in readers:
        t.start()
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        rss = pss = 0
        try:
            tree = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in tree:
            try:
                info = p.memory_full_info()
                rss, pss = rss + info.rss, pss + info.pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for t in readers:
        t.join()
    result = subprocess.CompletedProcess(cmd, proc.returncode, output.get("out", ""), output.get("err", ""))
    return result, peak["rss"], peak["pss"]


GB, MB = 1 << 30, 1 << 20


@memory_test
@pytest.mark.parametrize("layout", ["one file", "64 shards, a quarter Parquet"])
def test_pretraining_memory_does_not_grow_with_the_corpus(tmp_path, layout):
    small = repeated_corpus(tmp_path / "small.jsonl", 20 * MB)

    def train(data, name):
        cmd = [sys.executable, "train_model.py", "--data_path", data, "--out_dir", str(tmp_path / name),
               *TINY_MODEL_ARGS, "--batch_size", "8", "--max_steps", "40", "--num_workers", "2",
               "--log_interval", "10", "--eval_interval", "1000", "--eval_batches", "5", "--save_interval", "20"]
        result, rss, pss = peak_tree_memory(cmd, timeout=1800)
        assert result.returncode == 0, result.stderr[-3000:]
        return rss, pss

    small_rss, small_pss = train(small, "small")
    big = repeated_corpus(tmp_path / "big.jsonl", 2 * GB) if layout == "one file" \
        else sharded_corpus(tmp_path / "big", 2 * GB)
    try:
        big_rss, big_pss = train(big, "big")
    finally:
        if os.path.isdir(big):
            shutil.rmtree(big)
        else:
            os.remove(big)
    print(f"\npeak memory of the process tree, 40 steps, --num_workers 2: 20 MB corpus RSS {small_rss / MB:.0f} MB "
          f"(PSS {small_pss / MB:.0f} MB); 2 GB corpus ({layout}) RSS {big_rss / MB:.0f} MB "
          f"(PSS {big_pss / MB:.0f} MB)")
    # Summed RSS counts the pages the forked workers share with the main process (torch itself) three
    # times; PSS splits them, so it is the tree's real footprint.
    assert big_pss < 2 * GB and big_rss < 2.5 * GB
    assert big_pss < small_pss * 1.25 + 150 * MB, (small_pss, big_pss)
    assert big_rss < small_rss * 1.25 + 150 * MB, (small_rss, big_rss)


@memory_test
def test_tokenizer_training_memory_is_bounded(tmp_path):
    big = repeated_corpus(tmp_path / "big.jsonl", 2 * GB)
    try:
        cmd = [sys.executable, "tokenizer.py", "--data_path", big, "--vocab_size", "6144",
               "--out_dir", str(tmp_path / "tok")]
        result, rss, pss = peak_tree_memory(cmd, timeout=3600)
    finally:
        os.remove(big)
    print(f"\ntokenizer on a 2 GB corpus (default --max_train_bytes): peak RSS {rss / MB:.0f} MB "
          f"(PSS {pss / MB:.0f} MB); {result.stdout.strip()}")
    assert result.returncode == 0, result.stderr[-3000:]
    used = re.search(r"trained on ([\d.]+) MB of text", result.stdout)
    assert used, f"the tokenizer does not say how much text it used: {result.stdout}"
    assert 0 < float(used.group(1)) <= 2 * GB / 1e6
    assert rss < 4 * GB
    from transformers import AutoTokenizer
    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "tok"))) == 6144
