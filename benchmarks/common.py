"""What the benchmarks share: how they time, the machine they ran on, and the table they print.

The machine may be shared (on CPU a background job can take most of it), so nothing is timed alone:
contenders run in alternating rounds, one call each per round, and each figure is a contender's
fastest round. Load only ever adds time, so the fastest round is the least disturbed one, and the
alternation gives every contender the same chances at the quiet moments.

On CPU the races run one torch thread and time with the CPU time of their process (use_threads,
clock_for). With two OpenMP threads on two cores that another job also uses, every op waits at a
barrier for whichever thread is descheduled, so a step's time swings with the load far more than
with one thread, and one thread can be timed by its CPU time, which load does not change. Ratios
compare implementations, which one thread shows as well; absolute CPU figures are those of one core
(--threads 2 on an idle machine for both cores).
"""
import contextlib
import os
import platform
import socket
import sys
import time

import torch

from logger import synchronize

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repo_path(path):
    """A path of the repository (a script or shipped data), wherever the bench is run from."""
    return os.path.join(REPO_DIR, path)


def free_port():
    """A TCP port of 127.0.0.1 that nothing listens on now (for a server or a rendezvous to bind)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stderr_log():
    """A log function: each message on stderr after the seconds since this call, so that stdout holds
    only the table or the JSON."""
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:5.0f} s] {message}", file=sys.stderr, flush=True)
    return log


# --- timing ----------------------------------------------------------------------------------------

def use_threads(device, threads):
    """One torch thread on CPU unless `threads` says otherwise (see the module docstring); torch's
    choice on a GPU. TF32 matmuls on CUDA, as train_model.py trains there."""
    if threads or device.type == "cpu":
        torch.set_num_threads(threads or 1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True


def clock_for(device):
    """The clock of a timed call. On one CPU thread, the CPU time of this process: it counts what the
    work costs and not the time the core was lent to other processes, so a loaded machine no longer
    swings the figures (and on an idle machine it equals wall time). Otherwise wall time."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.process_time
    return time.perf_counter


def race(contenders, device, rounds, budget_s, warmup=1):
    """Seconds per call of each contender, round by round, and what each returned on its first call.

    Every round calls each contender once, the order reversed every other round so that neither
    always follows the other (caches, turbo clocks). `warmup` untimed calls come first. rounds is
    (min, max): past min, no round starts that would end after budget_s seconds, so a loaded machine
    gives fewer samples instead of a run of unbounded length.
    """
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    seconds = {name: [] for name in contenders}
    first = {}
    names, (min_rounds, max_rounds) = list(contenders), rounds
    clock, start = clock_for(device), time.perf_counter()
    for r in range(max_rounds):
        elapsed = time.perf_counter() - start
        if r >= min_rounds and elapsed * (r + 1) / r > budget_s:
            break
        for name in (names if r % 2 == 0 else names[::-1]):
            synchronize(device)
            call_start = clock()
            out = contenders[name]()
            synchronize(device)
            seconds[name].append(clock() - call_start)
            first.setdefault(name, out)
    return seconds, first


def best(seconds):
    """The fastest call: load from other processes only ever adds time, so the fastest of several
    alternating rounds is each contender's least disturbed run (as timeit takes the minimum)."""
    return min(seconds)


def speedup(ours_seconds, peer_seconds):
    """How many times faster ours is than the peer, best round against best round."""
    return best(peer_seconds) / best(ours_seconds)


# --- report ----------------------------------------------------------------------------------------

def machine(device):
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    import transformers
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "device": str(device),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_summary(m):
    """The machine of a run that times whole processes (serving, speedrun), in words."""
    return (f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, device {m['device']}"
            + ("" if m["load_average"] is None else f", load average {m['load_average']:.2f} at start"))


def row(section, figure, unit, ours, peer, ratio, goal=None):
    return dict(section=section, figure=figure, unit=unit, ours=ours, peer=peer, ratio=ratio, goal=goal,
                result=None if goal is None or ratio is None else ratio >= goal)


def plural(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


def fmt(value):
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


# (name, width, alignment) of the table's columns: fixed, since rows are printed as they are measured.
COLUMNS = (("section", 16, "<"), ("figure", 29, "<"), ("unit", 5, "<"), ("ours", 11, ">"), ("peer", 11, ">"),
           ("ratio", 7, ">"), ("goal", 7, ">"), ("result", 6, ">"))


def table_line(cells):
    return "  ".join(f"{cell:{align}{width}}" for cell, (_, width, align) in zip(cells, COLUMNS)).rstrip()


def table_header():
    return table_line([name for name, _, _ in COLUMNS])


def format_row(r):
    return table_line((r["section"], r["figure"], r["unit"], fmt(r["ours"]), fmt(r["peer"]),
                       "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
                       "-" if r["goal"] is None else f">={r['goal']:.3g}x",
                       "info" if r["result"] is None else ("PASS" if r["result"] else "FAIL")))
