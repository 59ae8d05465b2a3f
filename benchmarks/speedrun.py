"""The speedrun (python bench.py --speedrun RECIPE,RECIPE): time to quality of two training recipes.

Each recipe of recipes.SPEEDRUN_RECIPES pretrains train.sh's demo model on its data, batch and length
(recipes.DEMO_PRETRAIN), in a train_model.py process of its own, one after the other; only how they
optimize differs. From each run's evaluations (val_bpb against wall time) it reports the time each recipe
takes to reach the worse of the two final val_bpb (the quality both reach, interpolated between
evaluations) and the ratio of the final val_bpb.

The trade-offs: whole training runs cannot alternate round by round as the races do, so each is timed
alone, in wall time, and the figures are honest only on an otherwise idle machine; val_bpb, the quality,
does not depend on the load. The runs are kept under --speedrun_dir for report.py to plot.
"""
import json
import os
import shutil
import subprocess
import sys

import torch

from benchmarks.common import machine, machine_summary, repo_path, stderr_log
from recipes import DEMO_PRETRAIN, SPEEDRUN_RECIPES, shape_args

SPEEDRUN_ARGS = [*DEMO_PRETRAIN, "--eval_interval", "50"]
# --quick: the tests' tiny model for a few steps, evaluated often enough to draw a curve.
SPEEDRUN_QUICK_ARGS = [*shape_args("tiny"), "--batch_size", "4", "--max_steps", "6", "--eval_interval", "2",
                       "--eval_batches", "2"]
SPEEDRUN_GOALS = {"time_to_quality": 0.6, "final_bpb": 0.92}  # at most these ratios of the second to the first


def time_to_reach(points, target):
    """Seconds at which val_bpb first reaches target, interpolated linearly between the evaluations
    (elapsed_s, val_bpb) around it; None if it never does."""
    previous = (0.0, float("inf"))
    for seconds, bpb in points:
        if bpb <= target:
            if previous[1] == float("inf"):
                return seconds
            return previous[0] + (seconds - previous[0]) * (previous[1] - target) / (previous[1] - bpb)
        previous = (seconds, bpb)
    return None


def train_recipe(args, name, out_dir, log):
    """Pretrain with one recipe in a process of its own; [(elapsed_s, val_bpb)] of its evaluations."""
    argv = [sys.executable, repo_path("train_model.py"),
            "--data_path", args.data_path, "--tokenizer_path", args.tokenizer_path, "--out_dir", out_dir,
            "--device", args.device, "--save_interval", "0", "--seed", str(args.seed),
            *(SPEEDRUN_QUICK_ARGS if args.quick else SPEEDRUN_ARGS), *SPEEDRUN_RECIPES[name]]
    log(f"training {name}: {' '.join(argv[2:])}")
    shutil.rmtree(out_dir, ignore_errors=True)
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed: {done.stderr.strip().splitlines()[-1:]}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [(r["elapsed_s"], r["val_bpb"]) for r in records if "val_bpb" in r]


def bench_speedrun(args, names):
    """The two recipes `names`, one after the other: val_bpb against wall time, and each recipe's time to the
    worse of the two final val_bpb."""
    log = stderr_log()
    points = {name: train_recipe(args, name, os.path.join(args.speedrun_dir, name), log) for name in names}
    first, second = names
    final = {name: p[-1][1] for name, p in points.items()}
    seconds = {name: p[-1][0] for name, p in points.items()}
    target = max(final.values())
    results = {"machine": machine(torch.device(args.device)), "recipes": {n: SPEEDRUN_RECIPES[n] for n in names},
               "points": points, "final_bpb": final, "seconds": seconds, "target_bpb": target,
               "time_to_target": {name: time_to_reach(p, target) for name, p in points.items()}}
    reached = results["time_to_target"]
    results["time_ratio"] = reached[second] / reached[first]
    results["bpb_ratio"] = final[second] / final[first]
    return results


def print_report(results, names, speedrun_dir):
    (first, second), reached, final = names, results["time_to_target"], results["final_bpb"]
    print(f"Tiny-LLM speedrun: {machine_summary(results['machine'])}")
    for name in names:
        print(f"{name} ({' '.join(results['recipes'][name])}): val_bpb against wall time: "
              + ", ".join(f"{s:.0f} s {b:.4f}" for s, b in results["points"][name]))
    print(f"time to val_bpb {results['target_bpb']:.4f} (the worse final one): {first} {reached[first]:.0f} s, "
          f"{second} {reached[second]:.0f} s: {results['time_ratio']:.2f}x "
          f"(goal <= {SPEEDRUN_GOALS['time_to_quality']}x)")
    print(f"final val_bpb: {first} {final[first]:.4f}, {second} {final[second]:.4f}: "
          f"{results['bpb_ratio']:.3f}x (goal <= {SPEEDRUN_GOALS['final_bpb']}x); plots: "
          f"python report.py {' '.join(os.path.join(speedrun_dir, n) for n in names)}")


def run(args):
    """The speedrun of --speedrun's two recipes; prints the report (or the JSON) and returns the results."""
    names = args.speedrun.split(",")
    assert len(names) == 2 and all(n in SPEEDRUN_RECIPES for n in names), \
        f"--speedrun takes two of {sorted(SPEEDRUN_RECIPES)}"
    results = bench_speedrun(args, names)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_report(results, names, args.speedrun_dir)
    return results
