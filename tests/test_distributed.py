"""Distributed training: real `torchrun` processes (2 ranks, gloo on CPU) against one process.

N ranks with batch b must train exactly like one process with batch N*b: same losses, same weights, same
validation loss; gradient sync only on the last micro-batch of a step; only rank 0 writes; a checkpoint
resumes on another number of ranks; FSDP2 (--fsdp) trains like DDP and saves a loadable model, also with
bf16 parameters as on a GPU (--dtype bfloat16 runs CPU autocast, as a GPU run would).

Every run trains the TINY_MODEL_ARGS model for a handful of steps. The runs are launched once per module
(only those the selected tests need), several at a time, and the tests read their out_dirs and logs.

Data: the 2-rank runs use the first 600 lines of the shipped pretraining data rather than `pretrain_file`'s
400: those 400 lines hold a single validation block, so rank 1 has no validation batch at all, a case of
its own (test_val_loss_with_uneven_batches_over_ranks uses them).
"""
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from benchmarks.common import free_port
from conftest import (REPO, TINY_MODEL_ARGS, preference_pairs, read_metrics, saved_weights, shipped_lines,
                      step_losses, write_jsonl)

# Every test reads runs of 2 torchrun ranks (the `runs` fixture): 3-4 minutes for the module on 2 cores.
pytestmark = pytest.mark.slow

TRAIN = os.path.join(REPO, "train_model.py")
PROBE = os.path.join(REPO, "tests", "ddp_probe.py")
TOL = 1e-5
# The learning rate is large enough that each step moves every weight by about 1e-3, a hundred times the
# tolerance (and small enough that Adam's sign-like first steps do not amplify float32 rounding past it).
# AdamW unless a run says otherwise: the default (Muon, from scratch) orthogonalises in bf16, see muon_*.
COMMON = [*TINY_MODEL_ARGS, "--max_steps", "4", "--log_interval", "1", "--dropout", "0",
          "--optimizer", "adamw", "--lr_schedule", "cosine", "--learning_rate", "1e-3", "--warmup_iters", "1",
          "--seed", "1337"]
RUN_TIMEOUT = 300  # seconds; a healthy run takes 10-30 s, more when the module's runs share the 2 cores
# After the last step's loss is logged (or a stop signal is sent) only an evaluation and a save remain, a
# few seconds: a run still going this much later is deadlocked, and is killed without waiting for RUN_TIMEOUT.
AFTER_TRAINING_TIMEOUT = 30
PARALLEL_RUNS = 4  # 2 cores, but a run spends much of its time starting up, and a deadlocked one sleeps

NODES = "2 nodes"  # in RUNS: two torchrun launchers (--nnodes 2) of one process each, see launch_two_nodes
# name: (processes, data, extra arguments, script, run it needs first)
RUNS = {
    # Submitted first, as the runs that may deadlock (then sleeping until killed) in the code's failure modes.
    # Trains until SIGTERM reaches rank 1 alone (SIGTERM_RANK), early on.
    "sigterm_2": (2, "pretrain", ["--batch_size", "2", "--max_steps", "150"], TRAIN, None),
    "val_few_2": (2, "pretrain400", ["--batch_size", "2", "--max_steps", "1"], TRAIN, None),
    "val_uneven_fsdp_2": (2, "pretrain", ["--batch_size", "1", "--max_steps", "1", "--fsdp"], TRAIN, None),
    "val_few_1": (1, "pretrain400", ["--batch_size", "4", "--max_steps", "1"], TRAIN, None),
    "val_uneven_1": (1, "pretrain", ["--batch_size", "2", "--max_steps", "1"], TRAIN, None),
    "pre_1": (1, "pretrain", ["--batch_size", "4", "--save_interval", "2"], TRAIN, None),
    "pre_2": (2, "pretrain", ["--batch_size", "2", "--save_interval", "2"], TRAIN, None),
    "acc_1": (1, "pretrain", ["--batch_size", "4", "--accumulation_steps", "2", "--save_interval", "2"],
              TRAIN, None),
    "acc_2": (2, "pretrain", ["--batch_size", "2", "--accumulation_steps", "2", "--save_interval", "2"],
              TRAIN, None),
    "fsdp_2": (2, "pretrain", ["--batch_size", "2", "--accumulation_steps", "2", "--save_interval", "2",
                               "--fsdp"], TRAIN, None),
    "muon_1": (1, "pretrain", ["--batch_size", "4", "--accumulation_steps", "2", "--optimizer", "muon",
                               "--muon_learning_rate", "1e-3"], TRAIN, None),
    "muon_2": (2, "pretrain", ["--batch_size", "2", "--accumulation_steps", "2", "--optimizer", "muon",
                               "--muon_learning_rate", "1e-3"], TRAIN, None),
    # FSDP2's bf16 parameters (MixedPrecisionPolicy) against DDP under bf16 autocast, as a GPU run trains.
    "ddp_bf16_2": (2, "pretrain", ["--batch_size", "2", "--accumulation_steps", "2", "--save_interval", "2",
                                   "--dtype", "bfloat16"], TRAIN, None),
    "fsdp_bf16_2": (2, "pretrain", ["--batch_size", "2", "--accumulation_steps", "2", "--save_interval", "2",
                                    "--fsdp", "--dtype", "bfloat16"], TRAIN, None),
    "sftacc_1": (1, "sft", ["--mode", "sft", "--batch_size", "4", "--accumulation_steps", "2"],
                 TRAIN, None),
    "sftacc_2": (2, "sft", ["--mode", "sft", "--batch_size", "2", "--accumulation_steps", "2"],
                 TRAIN, None),
    # DPO with LoRA: the reference is the model with its adapters off, in each rank's forward.
    "dpolora_1": (1, "dpo", ["--init_from", "BASE", "--lora_rank", "4", "--batch_size", "4",
                             "--accumulation_steps", "2", "--learning_rate", "1e-2"], TRAIN, None),
    "dpolora_2": (2, "dpo", ["--init_from", "BASE", "--lora_rank", "4", "--batch_size", "2",
                             "--accumulation_steps", "2", "--learning_rate", "1e-2"], TRAIN, None),
    "probe": (2, "sft", ["--mode", "sft", "--batch_size", "2", "--accumulation_steps", "3",
                         "--max_steps", "2"], PROBE, None),
    # 2 ranks x batch 2 continue pre_1's (1 process x batch 4) checkpoint-2 up to step 4.
    "resume_2": (2, "pretrain", ["--batch_size", "2", "--save_interval", "2",
                                 "--resume", "@pre_1/checkpoint-2"], TRAIN, "pre_1"),
    # Two nodes of one process each (two torchrun launchers), then one process resumes their checkpoint-2.
    "nodes_2": (NODES, "pretrain", ["--batch_size", "2", "--save_interval", "2"], TRAIN, None),
    "nodes_resume_1": (1, "pretrain", ["--batch_size", "4", "--save_interval", "2",
                                       "--resume", "@nodes_2/out/checkpoint-2"], TRAIN, "nodes_2"),
}
SIGTERM_RANK = {"sigterm_2": 1}

# The runs each test reads (by the test function's name), so that a -k selection launches only those.
NEEDS = {
    "test_ddp_matches_single_process": ["pre_1", "pre_2", "acc_1", "acc_2", "sftacc_1", "sftacc_2", "muon_1",
                                        "muon_2"],
    "test_dpo_with_lora_under_ddp_matches_single_process": ["dpolora_1", "dpolora_2"],
    "test_gradient_sync_happens_only_in_the_last_backward_of_a_step": ["probe"],
    "test_synced_gradient_is_the_token_weighted_gradient_of_the_whole_step": ["probe"],
    "test_only_rank_0_writes": ["pre_1", "pre_2"],
    "test_resume_on_more_ranks_continues_the_same_run": ["pre_1", "resume_2"],
    "test_fsdp_trains_like_ddp": ["acc_2", "fsdp_2"],
    "test_fsdp_output_loads_and_matches_ddp_logits": ["acc_2", "fsdp_2"],
    "test_fsdp_with_bf16_parameters_trains_like_ddp_in_bf16": ["acc_2", "ddp_bf16_2", "fsdp_bf16_2"],
    "test_val_loss_is_averaged_over_ranks": ["pre_1", "pre_2", "sftacc_1", "sftacc_2"],
    "test_sigterm_to_one_rank_stops_every_rank_after_the_same_step": ["sigterm_2"],
    "test_two_nodes_train_like_one_process_and_resume_on_one": ["pre_1", "nodes_2", "nodes_resume_1"],
    "test_val_loss_with_uneven_batches_over_ranks": ["val_few_1", "val_few_2", "val_uneven_1",
                                                     "val_uneven_fsdp_2"],
}


# --- launching -------------------------------------------------------------------------------------

class Run:
    def __init__(self, name, out_dir, returncode, output, rank_logs, seconds, timed_out):
        self.name, self.out_dir, self.returncode, self.output = name, out_dir, returncode, output
        self.rank_logs, self.seconds, self.timed_out = rank_logs, seconds, timed_out

    def describe(self):
        """Everything the run printed, for assertion messages."""
        text = f"run {self.name}: exit {self.returncode}, {self.seconds:.0f} s" + \
               (" (TIMED OUT, killed)" if self.timed_out else "") + f"\n{self.output[-3000:]}"
        for rank, (out, err) in sorted(self.rank_logs.items()):
            text += f"\n--- rank {rank} stdout:\n{out[-2000:]}\n--- rank {rank} stderr:\n{err[-3000:]}"
        return text

    def check(self):
        assert self.returncode == 0 and not self.timed_out, self.describe()
        return self

    def metrics(self):
        return read_metrics(self.out_dir)

    def losses(self):
        return step_losses(self.out_dir)

    def val_loss(self):
        values = [r["val_loss"] for r in self.metrics() if "val_loss" in r]
        assert len(values) == 1, f"{self.name} logged {len(values)} validation losses\n{self.describe()}"
        return values[0]

    def weights(self, sub=""):
        return saved_weights(os.path.join(self.out_dir, sub))


def descendants(pid):
    """Every live process below pid (torchrun starts its workers in sessions of their own)."""
    children = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def launch(name, nproc, argv, script, out_dir, log_dir, timeout=RUN_TIMEOUT, sigterm_rank=None):
    """Run script (1 process, or torchrun with nproc ranks) to the end, or kill it on a timeout: the overall
    one, or AFTER_TRAINING_TIMEOUT after the last step's loss is logged or the signal is sent. With
    sigterm_rank, once step 2 is logged, SIGTERM goes to that rank's process alone."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if nproc == 1:
        command = [sys.executable, script, *argv]
    else:
        # Each rank's stdout and stderr go to log_dir/<run id>/attempt_0/<rank>/{stdout,stderr}.log.
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(nproc), "--log-dir", log_dir, "--redirects", "3", script, *argv]
    start = time.monotonic()
    output_path = log_dir + ".out"
    os.makedirs(os.path.dirname(output_path), exist_ok=True)
    with open(output_path, "w") as output_file:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=output_file, stderr=subprocess.STDOUT)
    max_steps = int(argv[len(argv) - argv[::-1].index("--max_steps")])  # the last one given wins
    timed_out, trained_at, signalled = False, None, False
    while proc.poll() is None:
        now = time.monotonic()
        step = last_logged_step(out_dir)
        if trained_at is None and step == max_steps:
            trained_at = now
        if sigterm_rank is not None and not signalled and step >= 2:
            for pid in descendants(proc.pid):
                try:
                    with open(f"/proc/{pid}/environ", "rb") as f:
                        environ = f.read().split(b"\0")
                    if f"RANK={sigterm_rank}".encode() in environ:
                        os.kill(pid, signal.SIGTERM)
                        signalled, trained_at = True, now
                except (OSError, ProcessLookupError):
                    continue
        if now - start > timeout or (trained_at is not None and now - trained_at > AFTER_TRAINING_TIMEOUT):
            timed_out = True
            for pid in descendants(proc.pid):  # the ranks first: torchrun waits 30 s for them on SIGTERM
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()
            proc.wait()
            break
        time.sleep(0.5)
    with open(output_path, errors="replace") as f:
        output = f.read()
    rank_logs = {}
    for path in glob.glob(os.path.join(log_dir, "*", "attempt_*", "*", "stdout.log")):
        rank = int(os.path.basename(os.path.dirname(path)))
        with open(path, errors="replace") as f, \
                open(os.path.join(os.path.dirname(path), "stderr.log"), errors="replace") as g:
            rank_logs[rank] = (f.read(), g.read())
    return Run(name, out_dir, proc.returncode, output, rank_logs, time.monotonic() - start, timed_out)


def launch_two_nodes(name, argv, node_dir, log_dir, timeout=RUN_TIMEOUT):
    """Two torchrun launchers, --nnodes 2 --node_rank 0 and 1, one process each, meeting at 127.0.0.1 (gloo
    on CPU) as two machines would. Each runs in a directory of its own (node_dir + "_node1" for node 1)
    with the relative --out_dir "out", so that a write by node 1 shows; the run's out_dir is node_dir/out."""
    argv = [a if a != node_dir else "out" for a in argv]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    port, start, procs = free_port(), time.monotonic(), []
    os.makedirs(os.path.dirname(log_dir), exist_ok=True)
    for node in (0, 1):
        cwd = node_dir if node == 0 else node_dir + "_node1"
        os.makedirs(cwd)
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                   "--nproc_per_node", "1", "--rdzv_endpoint", f"127.0.0.1:{port}",
                   "--log-dir", f"{log_dir}/node{node}", "--redirects", "3", TRAIN, *argv]
        with open(f"{log_dir}.node{node}.out", "w") as output_file:
            procs.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=output_file, stderr=subprocess.STDOUT))
    timed_out = False
    for proc in procs:
        try:
            proc.wait(timeout=max(1, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            timed_out = True
    for proc in procs:
        if proc.poll() is None:
            for pid in descendants(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
    output, rank_logs = "", {}
    for node in (0, 1):
        with open(f"{log_dir}.node{node}.out", errors="replace") as f:
            output += f"--- node {node} launcher:\n{f.read()}"
        for path in glob.glob(os.path.join(log_dir, f"node{node}", "*", "attempt_*", "0", "stdout.log")):
            with open(path, errors="replace") as f, \
                    open(os.path.join(os.path.dirname(path), "stderr.log"), errors="replace") as g:
                rank_logs[node] = (f.read(), g.read())  # one process per node: node n holds global rank n
    returncode = next((p.returncode for p in procs if p.returncode), 0)
    return Run(name, os.path.join(node_dir, "out"), returncode, output, rank_logs, time.monotonic() - start,
               timed_out)


def last_logged_step(out_dir):
    """The last step whose loss metrics.jsonl holds; 0 before any."""
    try:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return 0
    return max([r["step"] for r in records if "loss" in r], default=0)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, base_model):
    """name -> Run, for the runs the selected tests of this module need, launched PARALLEL_RUNS at a time."""
    base = tmp_path_factory.mktemp("distributed")
    data = {
        "pretrain400": write_jsonl(base / "pretrain.jsonl", shipped_lines("pretrain_poetry.jsonl.gz", 400)),
        "pretrain": write_jsonl(base / "pretrain600.jsonl", shipped_lines("pretrain_poetry.jsonl.gz", 600)),
        "sft": write_jsonl(base / "sft_small.jsonl", shipped_lines("sft_poetry.jsonl.gz", 400)),
        "dpo": write_jsonl(base / "dpo_small.jsonl", preference_pairs(400)),
    }
    here = request.module.__name__
    selected = {item.originalname for item in request.session.items if item.module.__name__ == here}
    wanted = {run for test in selected for run in NEEDS.get(test, [])}
    wanted |= {RUNS[run][4] for run in wanted if RUNS[run][4]}
    futures = {}

    def job(name):
        nproc, data_name, extra, script, after = RUNS[name]
        if after:
            prerequisite = futures[after].result()
            if prerequisite.returncode != 0:
                return prerequisite
        out_dir = str(base / name)
        extra = [a.replace("@", str(base) + os.sep) if a.startswith("@") else base_model if a == "BASE" else a
                 for a in extra]
        argv = ["--data_path", data[data_name], "--out_dir", out_dir, *COMMON, *extra]
        if data_name.startswith("pretrain"):
            # The token cache gives every number of ranks one global order of blocks (streaming ranks
            # would pack their own rows); each run builds its own.
            argv += ["--token_cache", str(base / f"{name}.tokens")]
        if nproc == NODES:
            return launch_two_nodes(name, argv, out_dir, str(base / "logs" / name))
        if script == PROBE:
            os.makedirs(base / "probe_results")
            argv = [str(base / "probe_results"), *argv]
        return launch(name, nproc, argv, script, out_dir, str(base / "logs" / name),
                      sigterm_rank=SIGTERM_RANK.get(name))

    pool = ThreadPoolExecutor(max_workers=PARALLEL_RUNS)
    for name in RUNS:  # in RUNS's order: a prerequisite is submitted before the run needing it
        if name in wanted:
            futures[name] = pool.submit(job, name)

    class Results:
        probe_dir = base / "probe_results"

        def __getitem__(self, name):
            return futures[name].result()

    yield Results()
    pool.shutdown(wait=True, cancel_futures=True)


def assert_same_losses(run, reference, steps, tol):
    losses, expected = run.losses(), reference.losses()
    assert sorted(losses) == steps, (losses, run.describe())
    for step in steps:
        assert abs(losses[step] - expected[step]) <= tol, \
            f"step {step}: loss {losses[step]} in {run.name}, {expected[step]} in {reference.name}"


def assert_same_weights(weights, expected, tol, what):
    assert weights.keys() == expected.keys(), what
    worst = max(weights, key=lambda k: (weights[k] - expected[k]).abs().max().item())
    diff = (weights[worst] - expected[worst]).abs().max().item()
    assert diff <= tol, f"{what}: {worst} differs by {diff:.3g} (tolerance {tol})"


# --- 1. DDP trains like one process with the whole batch ----------------------------------------------

@pytest.mark.parametrize("single,ranks", [("pre_1", "pre_2"), ("acc_1", "acc_2"), ("sftacc_1", "sftacc_2"),
                                          ("muon_1", "muon_2")],
                         ids=["pretrain", "pretrain-accumulation", "sft-accumulation", "muon-accumulation"])
def test_ddp_matches_single_process(runs, single, ranks):
    """2 ranks x batch 2 (x accumulation) vs 1 process x batch 4 (x accumulation): the same samples per
    step, so the same loss at every step and the same final weights. SFT conversations differ in length,
    so this also checks that every token of the step weighs the same whatever rank and micro-batch it
    lands in."""
    one, two = runs[single].check(), runs[ranks].check()
    assert_same_losses(two, one, [1, 2, 3, 4], TOL)
    tokens = {r["step"]: r["tokens"] for r in one.metrics() if "loss" in r}
    assert tokens == {r["step"]: r["tokens"] for r in two.metrics() if "loss" in r}
    losses = one.losses()
    assert abs(losses[4] - losses[1]) > 100 * TOL, f"training barely moved: {losses}"
    # Muon orthogonalises in bf16 (torch.optim.Muon's Newton-Schulz): the float32 rounding differences of
    # the two runs' gradients reach the weights as bf16-sized ones (measured 4.5e-5 after 4 steps).
    tol = 1e-4 if single == "muon_1" else TOL
    assert_same_weights(two.weights(), one.weights(), tol, f"final weights of {ranks} vs {single}")


def test_dpo_with_lora_under_ddp_matches_single_process(runs):
    """DPO with LoRA, 2 ranks x 2 pairs x 2 micro-batches vs 1 process x 4 pairs x 2: every pair of the step
    weighs the same, and each rank's reference (its own model with the adapters off) is the same model."""
    one, two = runs["dpolora_1"].check(), runs["dpolora_2"].check()
    assert_same_losses(two, one, [1, 2, 3, 4], TOL)
    for key in ("reward_margin", "reward_accuracy"):
        assert [r[key] for r in one.metrics() if "loss" in r] == \
            pytest.approx([r[key] for r in two.metrics() if "loss" in r], abs=TOL)
    # Step 1's policy is the reference (the adapters start at zero): loss log 2; then the adapters train.
    losses = one.losses()
    assert losses[1] == pytest.approx(math.log(2), abs=1e-6)
    assert max(abs(losses[step] - math.log(2)) for step in (2, 3, 4)) > 100 * TOL, f"training barely moved: {losses}"
    assert_same_weights(two.weights(), one.weights(), TOL, "final (merged) weights, 2 ranks vs 1")


# --- 2. gradient sync: only in the last backward of a step, and the right gradient -------------------

def test_gradient_sync_happens_only_in_the_last_backward_of_a_step(runs):
    """train_model.main under a DistributedDataParallel that records no_sync entries, forwards, backwards
    and its comm hook's all-reduces: with 3 micro-batches per step, micro-batches 1 and 2 run forward and
    backward inside no_sync and all-reduce nothing; micro-batch 3 runs its forward with sync on (DDP decides
    in the forward) and all its buckets are all-reduced during its backward."""
    runs["probe"].check()
    micro_batches, steps = 3, 2
    for rank in (0, 1):
        probe = torch.load(runs.probe_dir / f"rank{rank}.pt")
        assert probe["wrapped"] == 1
        events = probe["events"]
        assert [e for e, _ in events].count("no_sync") == (micro_batches - 1) * steps
        # Split at the optimizer steps (clip_grad_norm_ runs once per step, after the last backward).
        step_events, current = [], []
        for event in events:
            if event[0] == "step":
                step_events.append(current)
                current = []
            else:
                current.append(event)
        assert current == [] and len(step_events) == steps, events
        for number, events_of_step in enumerate(step_events, 1):
            micro, inside_backward, allreduces = 0, False, {}
            pending_no_sync = False
            for kind, value in events_of_step:
                if kind == "no_sync":
                    pending_no_sync = True
                elif kind == "forward":
                    micro += 1
                    last = micro == micro_batches
                    assert value == last, f"rank {rank} step {number}: micro-batch {micro} forward ran " \
                                          f"with gradient sync {value}"
                    assert pending_no_sync == (not last), \
                        f"rank {rank} step {number}: micro-batch {micro} no_sync entered: {pending_no_sync}"
                    pending_no_sync = False
                elif kind == "backward_start":
                    inside_backward = True
                elif kind == "backward_end":
                    inside_backward = False
                elif kind == "allreduce":
                    assert inside_backward, f"rank {rank} step {number}: all-reduce outside a backward"
                    allreduces[micro] = allreduces.get(micro, 0) + 1
            assert micro == micro_batches
            assert list(allreduces) == [micro_batches], \
                f"rank {rank} step {number}: all-reduces per micro-batch {allreduces}"


def test_synced_gradient_is_the_token_weighted_gradient_of_the_whole_step(runs):
    """After the 3 micro-batches of the first step (SFT, 2 ranks x batch 2) the gradient on each rank
    equals the gradient of one forward/backward over the step's 12 samples with the loss averaged over
    all their labelled tokens; averaging per micro-batch instead gives a measurably different gradient."""
    runs["probe"].check()
    grads = [torch.load(runs.probe_dir / f"rank{rank}.pt")["grads"] for rank in (0, 1)]
    reference = torch.load(runs.probe_dir / "reference.pt")
    assert grads[0].keys() == reference["reference"].keys()
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), f"{name}: ranks hold different gradients after the sync"
        torch.testing.assert_close(grad, reference["reference"][name], rtol=1e-4, atol=1e-6, msg=lambda m:
                                   f"{name}: synced gradient != whole-step gradient\n{m}")
    assert any(not torch.allclose(grad, reference["per_micro_batch_mean"][name], rtol=1e-4, atol=1e-6)
               for name, grad in grads[0].items()), "the data cannot tell token weighting from batch means"


# --- 3. only rank 0 writes -----------------------------------------------------------------------------

def test_only_rank_0_writes(runs):
    """After 2 ranks x 4 steps with --save_interval 2: one metrics.jsonl with each step once, complete
    checkpoints (with the single-process run's weights), and nothing printed by rank 1."""
    run = runs["pre_2"].check()
    found = [os.path.relpath(os.path.join(root, f), run.out_dir)
             for root, _, files in os.walk(run.out_dir) for f in files if f.startswith("metrics")]
    assert found == ["metrics.jsonl"]
    records = run.metrics()
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_loss" in r] == [4]
    assert len(records) == 5
    # Checkpoints: complete, nothing half-written left beside them, and the weights of that step.
    entries = sorted(os.listdir(run.out_dir))
    assert [e for e in entries if e.startswith("checkpoint")] == ["checkpoint-2", "checkpoint-4"]
    assert not [e for e in entries if ".tmp" in e or ".old" in e], entries
    single = runs["pre_1"].check()
    for step in (2, 4):
        checkpoint = os.path.join(run.out_dir, f"checkpoint-{step}")
        for name in ("config.json", "tiny_llm_config.json", "model.safetensors", "tokenizer.json",
                     "generation_config.json", "training_state.pt"):
            assert os.path.isfile(os.path.join(checkpoint, name)), f"{checkpoint} lacks {name}"
        state = torch.load(os.path.join(checkpoint, "training_state.pt"), weights_only=False)
        assert (state["step"], state["samples_seen"]) == (step, 4 * step)
        assert_same_weights(run.weights(f"checkpoint-{step}"), single.weights(f"checkpoint-{step}"), TOL,
                            f"checkpoint-{step}")
    # Output: rank 0 prints the header and the summary once; rank 1 prints nothing of the sort.
    assert sorted(run.rank_logs) == [0, 1], run.describe()
    out0, _ = run.rank_logs[0]
    assert out0.count("done: 4 steps") == 1 and out0.count("2 process(es)") == 1, run.describe()
    out1, err1 = run.rank_logs[1]
    assert out1.strip() == "", run.describe()
    for marker in ("done:", "process(es)", "loss", "step", "%|", "checkpoint", "warning"):
        assert marker not in err1, f"rank 1 wrote {marker!r}:\n{err1}"


# --- 4. resume on another number of ranks -----------------------------------------------------------------

def test_resume_on_more_ranks_continues_the_same_run(runs):
    """1 process x batch 4 to step 4 with a checkpoint at step 2; then 2 ranks x batch 2 resume that
    checkpoint: steps 3 and 4 see the same samples and give the same losses and final weights."""
    single, resumed = runs["pre_1"].check(), runs["resume_2"].check()
    assert_same_losses(resumed, single, [3, 4], TOL)
    tokens = {r["step"]: r["tokens"] for r in single.metrics() if "loss" in r}
    assert {r["step"]: r["tokens"] for r in resumed.metrics() if "loss" in r} == {3: tokens[3], 4: tokens[4]}
    assert abs(resumed.val_loss() - single.val_loss()) <= TOL
    assert_same_weights(resumed.weights(), single.weights(), TOL, "final weights after the resume")


# --- stopping on a signal ---------------------------------------------------------------------------------

def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(runs):
    """A stop signal reaches the ranks at different moments: torchrun forwards it to each in turn, a
    scheduler or a user may signal the processes one by one. Here rank 1 alone gets SIGTERM, after step 2:
    the ranks must agree on the step to stop after, save one checkpoint there and exit with 143 (128 +
    SIGTERM; the rank that got no signal stops as if it had), so torchrun reports the job as not finished."""
    run = runs["sigterm_2"]
    assert not run.timed_out, "the run did not stop (ranks that disagree on stopping deadlock)\n" + run.describe()
    assert run.returncode != 0 and "exitcode  : 143" in run.output, run.describe()
    last = max(run.losses())
    assert 2 <= last < 150, f"stopped after step {last}: the signal came too late to test anything"
    assert sorted(e for e in os.listdir(run.out_dir) if e.startswith("checkpoint")) == [f"checkpoint-{last}"]
    state = torch.load(os.path.join(run.out_dir, f"checkpoint-{last}", "training_state.pt"), weights_only=False)
    assert state["step"] == last


# --- multi-node ---------------------------------------------------------------------------------------------

def test_two_nodes_train_like_one_process_and_resume_on_one(runs):
    """Two torchrun launchers on this machine as two nodes of one CPU process each (2 x batch 2), against one
    process x batch 4: the same losses and weights; global rank 0 (node 0) alone writes, though node 1 runs
    with the same relative --out_dir in a directory of its own; one process resumes the nodes' checkpoint-2
    and ends where the single process does."""
    single, nodes, resumed = runs["pre_1"].check(), runs["nodes_2"].check(), runs["nodes_resume_1"].check()
    assert_same_losses(nodes, single, [1, 2, 3, 4], TOL)
    assert_same_weights(nodes.weights(), single.weights(), TOL, "final weights of the two nodes")
    assert sorted(e for e in os.listdir(nodes.out_dir) if e.startswith("checkpoint")) == \
        ["checkpoint-2", "checkpoint-4"]
    node1_dir = os.path.dirname(nodes.out_dir) + "_node1"
    assert os.listdir(node1_dir) == [], f"node 1 wrote {os.listdir(node1_dir)}"
    assert sorted(nodes.rank_logs) == [0, 1], nodes.describe()
    assert "done: 4 steps" in nodes.rank_logs[0][0] and "2 process(es)" in nodes.rank_logs[0][0]
    out1, err1 = nodes.rank_logs[1]
    assert out1.strip() == "" and "done:" not in err1, nodes.describe()
    assert_same_losses(resumed, single, [3, 4], TOL)
    assert_same_weights(resumed.weights(), single.weights(), TOL, "final weights after resuming on one process")


# --- 5. FSDP2 -----------------------------------------------------------------------------------------

def test_fsdp_trains_like_ddp(runs):
    """--fsdp (FSDP2's fully_shard, gloo on CPU), 2 ranks x batch 2 x 2 micro-batches, against DDP:
    the same losses, validation loss, checkpoint (weights and optimizer state) and final weights."""
    ddp, fsdp = runs["acc_2"].check(), runs["fsdp_2"].check()
    tol = 1e-4
    assert_same_losses(fsdp, ddp, [1, 2, 3, 4], tol)
    assert abs(fsdp.val_loss() - ddp.val_loss()) <= tol
    assert_same_weights(fsdp.weights(), ddp.weights(), tol, "final weights, FSDP vs DDP")
    assert_same_weights(fsdp.weights("checkpoint-2"), ddp.weights("checkpoint-2"), tol, "checkpoint-2")
    states = [torch.load(os.path.join(r.out_dir, "checkpoint-2", "training_state.pt"), weights_only=False)
              for r in (fsdp, ddp)]
    optimizer_states = [s["optimizer"]["state"] for s in states]
    assert optimizer_states[0].keys() == optimizer_states[1].keys()
    for key, value in optimizer_states[1].items():
        for field in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(optimizer_states[0][key][field], value[field], rtol=1e-3, atol=1e-6)


def test_fsdp_output_loads_and_matches_ddp_logits(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model import Transformer
    ddp, fsdp = runs["acc_2"].check(), runs["fsdp_2"].check()
    tokenizer = AutoTokenizer.from_pretrained(fsdp.out_dir)
    input_ids = torch.tensor([tokenizer("床前明月光，疑是地上霜。", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        hf_fsdp = AutoModelForCausalLM.from_pretrained(fsdp.out_dir).eval()(input_ids).logits
        hf_ddp = AutoModelForCausalLM.from_pretrained(ddp.out_dir).eval()(input_ids).logits
        ours_fsdp = Transformer.from_pretrained(fsdp.out_dir).eval()(input_ids).logits
    torch.testing.assert_close(hf_fsdp, hf_ddp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_fsdp, hf_fsdp, rtol=1e-4, atol=1e-4)


def test_fsdp_with_bf16_parameters_trains_like_ddp_in_bf16(runs):
    """A GPU run's FSDP2: bf16 parameters in the forward and backward (MixedPrecisionPolicy), float32
    gradient reduction and master weights. Against DDP under bf16 autocast (float32 weights, bf16 matmuls):
    the same losses within bf16's rounding, both near float32's, and a float32 checkpoint that transformers
    loads and computes as our model does."""
    from transformers import AutoModelForCausalLM

    from model import Transformer
    fp32, ddp, fsdp = runs["acc_2"].check(), runs["ddp_bf16_2"].check(), runs["fsdp_bf16_2"].check()
    for run in (ddp, fsdp):
        assert "torch.bfloat16" in run.rank_logs[0][0], run.describe()
    # Measured: losses within 2.4e-4 of each other and of float32's, weights within 4e-3.
    assert_same_losses(fsdp, ddp, [1, 2, 3, 4], 2e-3)
    assert_same_losses(fsdp, fp32, [1, 2, 3, 4], 2e-3)
    assert fsdp.losses() != fp32.losses()  # bf16 did run
    assert abs(fsdp.val_loss() - ddp.val_loss()) <= 2e-3
    for sub in ("", "checkpoint-2"):
        weights = fsdp.weights(sub)
        assert all(w.dtype == torch.float32 for w in weights.values())
        assert_same_weights(weights, ddp.weights(sub), 1e-2, f"FSDP bf16 vs DDP bf16 {sub or 'final'}")
    input_ids = torch.tensor([[5, 300, 17, 2900, 44, 1024, 9, 77]])
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(fsdp.out_dir).eval()(input_ids).logits
        ours = Transformer.from_pretrained(fsdp.out_dir).eval()(input_ids).logits
    torch.testing.assert_close(ours, hf, rtol=1e-4, atol=1e-4)


# --- 6. validation loss over ranks ------------------------------------------------------------------------

@pytest.mark.parametrize("single,ranks", [("pre_1", "pre_2"), ("sftacc_1", "sftacc_2")], ids=["pretrain", "sft"])
def test_val_loss_is_averaged_over_ranks(runs, single, ranks):
    """The validation samples are split over the ranks (pretrain: 2 blocks on rank 0, 1 on rank 1) and the
    loss is per token over all of them: the same as one process evaluating them all."""
    one, two = runs[single].check(), runs[ranks].check()
    assert abs(two.val_loss() - one.val_loss()) <= TOL, (two.val_loss(), one.val_loss())


@pytest.mark.parametrize("single,ranks", [("val_few_1", "val_few_2"), ("val_uneven_1", "val_uneven_fsdp_2")],
                         ids=["ddp-rank-without-val-batch", "fsdp-ranks-with-2-and-1-val-batches"])
def test_val_loss_with_uneven_batches_over_ranks(runs, single, ranks):
    """The validation samples need not fill the same number of batches on every rank. pretrain_file's 400
    lines hold one validation block: under DDP rank 0 evaluates it and rank 1 has nothing. The first 600
    lines hold three: under FSDP with batch 1, rank 0 runs 2 batches and rank 1 one. Either run must still
    finish, with the validation loss one process computes over the same blocks."""
    one, two = runs[single].check(), runs[ranks]
    assert two.returncode == 0 and not two.timed_out, \
        "2-rank run did not finish (deadlock in the final evaluation?)\n" + two.describe()
    assert abs(two.val_loss() - one.val_loss()) <= TOL
