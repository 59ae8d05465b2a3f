"""Write a report of one or more training runs: report.md and PNG plots, runs overlaid for comparison.

    python report.py runs/demo/base runs/demo/sft              -> report/report.md, report/*.png
    python report.py runs/a runs/b --out_dir compare_ab

Reads each run's metrics.jsonl (written by train_model.py) and, when present, the eval.json that
`eval.py --json RUN_DIR/eval.json` wrote. Plots: training loss, val_loss and val_bpb against tokens and
against wall time, learning rate, tokens/s, and the scores of `--eval_tasks`. val_bpb is the curve to
compare between runs with different tokenizers; val_loss is per token and changes meaning with them.
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

def load_run(run_dir):
    """{"name", "train": [records], "val": [records], "eval": eval.json or None} of a run directory."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{run_dir} has no metrics.jsonl; pass a --out_dir of train_model.py")
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number}: invalid JSON")
    if not records:
        raise ValueError(f"{path} is empty")
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "loss" not in r]
    # Runs logged before validation records carried their token count: take it from the training log.
    tokens_at = {r["step"]: r["tokens"] for r in train if "tokens" in r}
    for r in val:
        r.setdefault("tokens", tokens_at.get(r["step"]))
    evaluation = None
    if os.path.isfile(os.path.join(run_dir, "eval.json")):
        with open(os.path.join(run_dir, "eval.json")) as f:
            evaluation = json.load(f)
    return {"name": os.path.normpath(run_dir), "train": train, "val": val, "eval": evaluation}


def series(records, x, y):
    points = [(r[x], r[y]) for r in records if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot(runs, panels, path, title):
    """One figure with a panel per (records key, x, y, label) that some run has data for (a run logged
    before wall time or val_bpb were has none); every run is a line in every panel."""
    panels = [p for p in panels if any(series(run[p[0]], p[1], p[2])[0] for run in runs)]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (kind, x, y, ylabel) in zip(axes[0], panels):
        for run in runs:
            xs, ys = series(run[kind], x, y)
            if xs:
                ax.plot(xs, ys, marker="o" if kind == "val" else None, markersize=3, label=run["name"])
        ax.set_xlabel({"tokens": "tokens", "elapsed_s": "wall time (s)", "step": "step"}[x])
        if x == "tokens":
            ax.xaxis.set_major_formatter(EngFormatter())  # 1.5 M tokens, not 1500000
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def score_keys(runs):
    """The "task/metric" keys that --eval_tasks logged, in first-seen order."""
    keys = []
    for run in runs:
        for r in run["val"]:
            keys += [k for k in r if "/" in k and k not in keys]
    return keys


def last(records, key):
    values = [r[key] for r in records if r.get(key) is not None]
    return values[-1] if values else None


def fmt(value, digits=4):
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"


def score_table(runs):
    """Markdown rows: one per task and metric of the runs' eval.json, a column per run (value ± stderr)."""
    evaluated = [run for run in runs if run["eval"]]
    if not evaluated:
        return []
    cells, chance = {}, {}
    for i, run in enumerate(evaluated):
        for s in run["eval"]["scores"]:
            key = (s["task"], s["metric"])
            chance[key] = s["chance"]
            stderr = f" ± {s['stderr']:.3f}" if s["stderr"] is not None else ""
            cells.setdefault(key, ["-"] * len(evaluated))[i] = f"{s['value']:.3f}{stderr}"
    names = [run["name"] + (" (chat)" if run["eval"].get("chat") else "") for run in evaluated]
    rows = ["| task | metric | chance | " + " | ".join(names) + " |",
            "| --- | --- | ---: | " + " | ".join("---:" for _ in names) + " |"]
    for (task, metric), values in cells.items():
        rows.append(f"| {task} | {metric} | {fmt(chance[(task, metric)], 3)} | " + " | ".join(values) + " |")
    return rows


def write_report(runs, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    figures = [
        ("loss.png", "training loss", [("train", "tokens", "loss", "loss"), ("train", "elapsed_s", "loss", "loss")]),
        ("val.png", "validation: loss per token and bits per byte",
         [("val", "tokens", "val_loss", "val_loss"), ("val", "tokens", "val_bpb", "val_bpb"),
          ("val", "elapsed_s", "val_bpb", "val_bpb")]),
        ("lr_throughput.png", "learning rate and throughput",
         [("train", "step", "lr", "learning rate"), ("train", "step", "tokens_per_sec", "tokens/s")]),
    ]
    keys = score_keys(runs)
    if keys:
        figures.append(("scores.png", "eval scores (--eval_tasks)", [("val", "tokens", k, k) for k in keys]))
    lines = ["# Training report", "", "| run | steps | tokens | wall time (s) | loss | val_loss | val_bpb | tokens/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in runs:
        train, val = run["train"], run["val"]
        throughput = [r["tokens_per_sec"] for r in train if "tokens_per_sec" in r]
        lines.append(f"| {run['name']} | {fmt(last(train + val, 'step'))} | {fmt(last(train, 'tokens'))} | "
                     f"{fmt(last(train + val, 'elapsed_s'), 0)} | {fmt(last(train, 'loss'))} | "
                     f"{fmt(last(val, 'val_loss'))} | {fmt(last(val, 'val_bpb'))} | "
                     f"{fmt(sum(throughput) / len(throughput) if throughput else None, 0)} |")
    table = score_table(runs)
    if table:
        lines += ["", "## Evaluation (eval.py)", "", *table]
    lines.append("")
    for name, title, panels in figures:
        if plot(runs, panels, os.path.join(out_dir, name), title):
            lines += [f"## {title}", "", f"![{title}]({name})", ""]
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return os.path.join(out_dir, "report.md")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="--out_dir of train_model.py runs")
    p.add_argument("--out_dir", default="report", help="where report.md and the plots go")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        runs = [load_run(run_dir) for run_dir in args.run_dirs]
    except ValueError as e:
        sys.exit(f"error: {e}")
    path = write_report(runs, args.out_dir)
    print("\n".join(score_table(runs)))
    print(f"wrote {path} and its plots")


if __name__ == "__main__":
    main()
