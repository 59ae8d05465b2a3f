"""report.py on real training runs, and --eval_tasks scores logged during training."""
import json
import os

import pytest

from conftest import TINY_MODEL_ARGS, read_metrics, run_main, shipped_lines, write_jsonl


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny pretraining runs of 4 steps, the first scoring poetry_author at each evaluation."""
    root = tmp_path_factory.mktemp("runs")
    data = write_jsonl(root / "pretrain.jsonl", shipped_lines("pretrain_poetry.jsonl.gz", 1000))
    # 128 positions: the longest bundled item takes about 100 tokens.
    common = ["--data_path", data, *TINY_MODEL_ARGS, "--max_seq_len", "128", "--batch_size", "4", "--max_steps", "4",
              "--log_interval", "1", "--eval_interval", "2", "--eval_batches", "2", "--save_interval", "0"]
    assert run_main(["--out_dir", root / "a", *common, "--eval_tasks", "poetry_author"]) is None
    assert run_main(["--out_dir", root / "b", *common, "--learning_rate", "1e-3"]) is None
    return str(root / "a"), str(root / "b")


@pytest.mark.slow
def test_eval_tasks_scores_equal_eval_py_on_the_saved_model(runs, tmp_path):
    """The score logged at the last evaluation is eval.py's (lm-eval's) score of the final model."""
    import eval as evaluation
    logged = [r for r in read_metrics(runs[0]) if "poetry_author/acc" in r]
    assert [r["step"] for r in logged] == [2, 4]
    out = tmp_path / "eval.json"
    evaluation.main(["--model", runs[0], "--tasks", "poetry_author", "--device", "cpu", "--json", str(out)])
    with open(out) as f:
        results = json.load(f)["results"]["poetry_author"]
    assert logged[-1]["poetry_author/acc"] == pytest.approx(results["acc,none"], abs=1e-6)
    assert not [r for r in read_metrics(runs[1]) if any("/" in k for k in r)]  # off by default


@pytest.mark.slow
def test_report_tables_and_plots_of_two_runs(runs, tmp_path):
    import report
    from PIL import Image
    report.main([*runs, "--out_dir", str(tmp_path / "report")])
    with open(tmp_path / "report" / "report.md", encoding="utf-8") as f:
        text = f.read()
    for run in runs:
        val = [r for r in read_metrics(run) if "val_bpb" in r][-1]
        train = [r for r in read_metrics(run) if "loss" in r][-1]
        row = next(line for line in text.splitlines() if line.startswith(f"| {os.path.normpath(run)} |"))
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[1] == "4" and cells[2] == f"{train['tokens']:,}"
        assert float(cells[4]) == pytest.approx(train["loss"], abs=1e-4)
        assert float(cells[5]) == pytest.approx(val["val_loss"], abs=1e-4)
        assert float(cells[6]) == pytest.approx(val["val_bpb"], abs=1e-4)
    for name in ("loss.png", "val.png", "lr_throughput.png", "scores.png"):
        assert f"]({name})" in text
        with Image.open(tmp_path / "report" / name) as image:
            assert image.format == "PNG" and image.size[0] > 500


def test_report_of_a_directory_without_metrics(tmp_path):
    import report
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path)])
    assert str(e.value.code).startswith("error: ") and "metrics.jsonl" in str(e.value.code)
