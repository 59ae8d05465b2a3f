"""Bad input: broken lines, broken or empty files, wrong arguments, models that do not fit.

A bad line is skipped and counted, and one warning on stderr gives the count and the first file:line
positions. Whatever stops the run says so in one line, "error: ...", with no traceback, before any work
where it can be known up front. Most runs are in-process `train_model.main([...])` calls on the tiny
model, caught as SystemExit; a few subprocesses check what a user really sees.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import (REPO, SUBPROCESS_ENV, TINY_MODEL_ARGS, TOKENIZER_DIR, preference_pairs, read_metrics,
                      run_main, shipped_lines, tiny_config, write_jsonl)

FAST = [*TINY_MODEL_ARGS, "--batch_size", "4", "--log_interval", "1", "--eval_interval", "1000",
        "--eval_batches", "2", "--save_interval", "0"]
SHORT_POEM_LINES = ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。", "春眠不觉晓，处处闻啼鸟。",
                    "夜来风雨声，花落知多少。", "白日依山尽，黄河入海流。"]


def train_argv(data, out, *extra):
    return ["--data_path", data, "--out_dir", out, *FAST, *extra]


def assert_one_line_error(code, capfd, *fragments):
    """The run stopped with SystemExit("error: ...") on one line, naming each fragment, no traceback."""
    err = capfd.readouterr().err
    assert isinstance(code, str), f"expected a SystemExit('error: ...'), got {code!r}; stderr:\n{err[-3000:]}"
    assert code.startswith("error:") and "\n" not in code.strip(), code
    assert "Traceback" not in err, err[-3000:]
    for fragment in fragments:
        assert str(fragment) in code, f"{fragment!r} not in {code!r}"
    return code


def warnings_in(err):
    return [line for line in err.splitlines() if line.startswith("warning:") and "bad line" in line]


def short_text_lines(count):
    return [{"text": SHORT_POEM_LINES[i % len(SHORT_POEM_LINES)]} for i in range(count)]


def insert_at(records, bad):
    """records with bad[line] placed so that it is at 1-based line number `line` of the file."""
    records = list(records)
    for line, record in sorted(bad.items()):
        records.insert(line - 1, record)
    return records


# --- bad lines: skipped, counted, reported once ----------------------------------------------------

PRETRAIN_BAD = {
    3: b'{"text": "an unterminated string',                         # invalid JSON
    50: b'{"text": "\xff\xfe\xfd not UTF-8"}',                        # invalid UTF-8
    120: {"title": "a poem without text"},                          # missing text
    333: {"text": "   "},                                           # empty text
    450: {"text": 42},                                              # non-string text
    611: b'["a JSON list, not an object"]',                         # not an object
}
SFT_BAD = {
    2: {"messages": [{"role": "wizard", "content": "咒语"}, {"role": "assistant", "content": "好"}]},
    40: {"messages": [{"role": "user", "content": "只有问题，没有回答"}]},
    77: {"messages": [{"role": "user", "content": ["不是", "字符串"]}, {"role": "assistant", "content": "好"}]},
    150: {"conversations": [{"from": "human", "value": "你好"}, {"from": "bot", "value": "未知角色"}]},
    230: {"text": "a pretraining line in SFT data"},
    260: {"messages": []},
    333: b'{"messages": [{"role": "user", "content": "\xc3\x28"}, {"role": "assistant", "content": "x"}]}',
    401: b'{"messages": [',
}


@pytest.mark.parametrize("workers", ["0", "2"])
def test_bad_pretraining_lines_are_skipped_and_reported_once(workers, tmp_path, capfd):
    data = write_jsonl(tmp_path / "pretrain.jsonl",
                       insert_at(shipped_lines("pretrain_poetry.jsonl.gz", 700), PRETRAIN_BAD))
    assert run_main(train_argv(data, tmp_path / "out", "--max_steps", "2", "--num_workers", workers)) is None
    warnings = warnings_in(capfd.readouterr().err)
    assert len(warnings) == 1, warnings
    assert re.search(r"\b6 bad line", warnings[0]), warnings[0]
    for line in (3, 50, 120):  # the first few positions, as file:line
        assert f"{data}:{line}" in warnings[0], warnings[0]


def test_bad_sft_lines_are_skipped_and_reported_once(tmp_path, capfd):
    data = write_jsonl(tmp_path / "sft_bad.jsonl", insert_at(shipped_lines("sft_poetry.jsonl.gz", 900), SFT_BAD))
    # batch 16: SFT sorts windows of 64 batches by length, so the first batch reads all 908 lines.
    assert run_main(train_argv(data, tmp_path / "out", "--max_steps", "2", "--batch_size", "16")) is None
    warnings = warnings_in(capfd.readouterr().err)
    assert len(warnings) == 1, warnings
    assert re.search(rf"\b{len(SFT_BAD)} bad line", warnings[0]), warnings[0]
    for line in (2, 40, 77):
        assert f"{data}:{line}" in warnings[0], warnings[0]


def test_bad_lines_are_reported_when_the_run_stops_before_the_end_of_the_file(tmp_path, capfd):
    """A run that ends at --max_steps long before the end of the file still says it skipped lines."""
    records = insert_at(shipped_lines("pretrain_poetry.jsonl.gz", 3000), {5: b"{broken", 9: {"text": 7}})
    data = write_jsonl(tmp_path / "pretrain.jsonl", records)
    assert run_main(train_argv(data, tmp_path / "out", "--max_steps", "1")) is None
    warnings = warnings_in(capfd.readouterr().err)
    assert warnings and f"{data}:5" in warnings[0], "the skipped lines 5 and 9 were never reported"


def test_bad_line_is_reported_once_over_several_epochs(tmp_path, capfd):
    data = write_jsonl(tmp_path / "pretrain.jsonl", insert_at(short_text_lines(300), {7: b"{broken"}))
    assert run_main(train_argv(data, tmp_path / "out", "--epochs", "2", "--batch_size", "16")) is None
    warnings = warnings_in(capfd.readouterr().err)
    assert len(warnings) == 1, f"one warning expected, got {len(warnings)}: {warnings}"


def test_one_bad_line_anywhere_in_a_file_is_tolerated(tmp_path, capfd):
    """One bad line in 400 (0.25%, under the default 1%) is skipped wherever it is, line 200 included
    (a line that the train/validation split happens to hold out)."""
    records = shipped_lines("pretrain_poetry.jsonl.gz", 400)
    records[199] = b"{broken"
    data = write_jsonl(tmp_path / "pretrain.jsonl", records)
    code = run_main(train_argv(data, tmp_path / "out", "--max_steps", "1"))
    assert code is None, code
    assert f"{data}:200" in "".join(warnings_in(capfd.readouterr().err))


def test_a_small_valid_file_trains(tmp_path):
    """150 good lines: nothing is wrong with the file, so it must train (not 'the file is empty')."""
    data = write_jsonl(tmp_path / "pretrain.jsonl", shipped_lines("pretrain_poetry.jsonl.gz", 150))
    code = run_main(train_argv(data, tmp_path / "out", "--max_steps", "1"))
    assert code is None, code
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")


# --- bad files: one-line errors naming the file ------------------------------------------------------

def test_empty_file_stops_with_one_line(tmp_path, capfd):
    for name, content in (("pretrain_empty.jsonl", b""), ("sft_empty.jsonl", b""), ("pretrain_blank.jsonl", b"\n \n\n")):
        path = tmp_path / name
        path.write_bytes(content)
        code = run_main(train_argv(path, tmp_path / ("out_" + name), "--max_steps", "1"))
        assert_one_line_error(code, capfd, path)
        assert "empty" in code, code
        assert not os.path.exists(tmp_path / ("out_" + name)), "the run did work before finding the file empty"


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_file_without_a_valid_line_stops_with_one_line(kind, tmp_path, capfd):
    bad = PRETRAIN_BAD if kind == "pretrain" else SFT_BAD
    path = write_jsonl(tmp_path / f"{kind}_bad.jsonl", list(bad.values()) * 3)
    code = run_main(train_argv(path, tmp_path / "out", "--max_steps", "1", "--mode", kind))
    assert_one_line_error(code, capfd, path, "no valid")


@pytest.mark.parametrize("name,mode", [("chat.jsonl", "sft"), ("pairs.jsonl", "dpo")])
def test_conversations_in_a_file_whose_name_does_not_say_so_ask_for_the_mode(name, mode, tmp_path, capfd):
    """--mode auto reads a file named neither *sft* nor *dpo* as pretraining text; its rows say what they are."""
    rows = shipped_lines("sft_poetry.jsonl.gz", 50) if mode == "sft" else preference_pairs(50)
    path = write_jsonl(tmp_path / name, rows)
    code = run_main(train_argv(path, tmp_path / "out", "--max_steps", "1"))
    assert_one_line_error(code, capfd, path, f"pass --mode {mode}")


def test_too_many_bad_lines_stop_the_run_unless_allowed(tmp_path, capfd):
    good = shipped_lines("pretrain_poetry.jsonl.gz", 400)
    records = insert_at(good, {line: b"{broken" for line in range(10, 110, 10)})  # 10 in 410: 2.4%
    path = write_jsonl(tmp_path / "pretrain.jsonl", records)
    code = run_main(train_argv(path, tmp_path / "out", "--max_steps", "1"))
    assert_one_line_error(code, capfd, path, "max_bad_fraction")
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")
    assert run_main(train_argv(path, tmp_path / "out2", "--max_steps", "1", "--max_bad_fraction", "0.05")) is None


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_strict_stops_at_the_first_bad_line(kind, tmp_path, capfd):
    good = shipped_lines("pretrain_poetry.jsonl.gz" if kind == "pretrain" else "sft_poetry.jsonl.gz", 400)
    bad = {7: b"{broken", 90: b"{also broken"} if kind == "pretrain" else {7: SFT_BAD[40], 90: SFT_BAD[2]}
    path = write_jsonl(tmp_path / f"{kind}.jsonl", insert_at(good, bad))
    code = run_main(train_argv(path, tmp_path / "out", "--max_steps", "1", "--strict", "--mode", kind))
    assert_one_line_error(code, capfd, f"{path}:7")


def late_bad_lines_file(path, bad):
    """2000 one-token lines (past what the up-front check reads, a DataLoader worker meets the rest
    within a few steps), more good lines, and `bad` {line: record} among them."""
    return write_jsonl(path, insert_at([{"text": "春"}] * 2400, bad))


@pytest.mark.slow
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "too-many"])
def test_error_found_in_a_dataloader_worker_is_one_line(strict, tmp_path, capfd):
    """Bad lines past the up-front check, met by a DataLoader worker: still one line, no traceback."""
    if strict:
        path = late_bad_lines_file(tmp_path / "pretrain.jsonl", {2101: b"{broken"})
        fragments = [f"{path}:2101"]
    else:
        path = late_bad_lines_file(tmp_path / "pretrain.jsonl", {line: b"{broken" for line in range(2001, 2101)})
        fragments = [path, "max_bad_fraction"]
    extra = ["--strict"] if strict else []
    code = run_main(train_argv(path, tmp_path / "out", "--max_steps", "60", "--batch_size", "8",
                               "--num_workers", "2", *extra))
    assert_one_line_error(code, capfd, *fragments)


@pytest.mark.slow
def test_what_a_user_sees_on_the_command_line(tmp_path):
    """Real processes: a missing file, and a bad line met in a DataLoader worker, each give one stderr
    line and the process exits."""
    late = late_bad_lines_file(tmp_path / "pretrain.jsonl", {2101: b"{broken"})
    runs = {
        "missing file": [*train_argv(tmp_path / "missing.jsonl", tmp_path / "out1"), "--max_steps", "1"],
        "bad line in a worker": [*train_argv(late, tmp_path / "out2"), "--max_steps", "60", "--batch_size", "8",
                                 "--num_workers", "2", "--strict"],
    }
    expected = {"missing file": "missing.jsonl", "bad line in a worker": f"{late}:2101"}
    procs, problems = {}, []
    for name, argv in runs.items():
        err_path = tmp_path / f"{name.replace(' ', '_')}.err"
        with open(err_path, "w") as err_file:
            procs[name] = (subprocess.Popen([sys.executable, "train_model.py", *map(str, argv)], cwd=REPO,
                                            env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=err_file,
                                            start_new_session=True), err_path)
    try:
        for name, (proc, err_path) in procs.items():
            # Up to 3 minutes for the error to come (a loaded machine); then 20 s to exit.
            deadline, exit_deadline = time.monotonic() + 180, None
            while proc.poll() is None and time.monotonic() < (exit_deadline or deadline):
                if exit_deadline is None and "error:" in err_path.read_text():
                    exit_deadline = time.monotonic() + 20
                time.sleep(0.1)
            err = err_path.read_text()
            if proc.poll() is None:
                problems.append(f"{name}: still running {'20 s after printing the error (hung)' if exit_deadline else 'after 180 s'}; stderr:\n{err[-2000:]}")
                continue
            lines = [line for line in err.splitlines() if line.strip()]
            if proc.returncode == 0 or "Traceback" in err or len(lines) != 1 or not lines[0].startswith("error:") \
                    or expected[name] not in lines[0]:
                problems.append(f"{name}: exit code {proc.returncode}, stderr:\n{err[-2000:]}")
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert not problems, "\n".join(problems)


# --- SFT truncation --------------------------------------------------------------------------------

LONG_ANSWER = {"messages": [{"role": "user", "content": "请背诵《春晓》一百遍。"},
                            {"role": "assistant", "content": "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。" * 40}]}


def test_long_sft_conversation_is_truncated_and_trains(tmp_path, tokenizer, capfd):
    from dataset import SFTDataset
    path = write_jsonl(tmp_path / "sft_long.jsonl", [LONG_ANSWER] * 300)
    full = tokenizer.apply_chat_template(LONG_ANSWER["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert len(full) > 64 * 5
    sample = next(iter(SFTDataset(path, tokenizer, 64, batch_size=4)))
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    assert ids == full[:64] and len(labels) == 64
    # The prompt is masked, the answer is learnt up to the cut: labels end with the answer's tokens.
    first = next(i for i, label in enumerate(labels) if label != -100)
    assert all(label == -100 for label in labels[:first]) and labels[first:] == ids[first:]
    assert 0 < first < 40

    out = tmp_path / "out"
    assert run_main(train_argv(path, out, "--max_steps", "3")) is None
    printed = capfd.readouterr()
    assert "non-finite" not in printed.out + printed.err
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses)


# The run's --seed orders its batches: this one puts the batch of long prompts at step 3 (the default seed at
# step 63). long_prompt_run finds the step whatever the seed.
LONG_PROMPT_SEED = 8


def long_prompt_run(tmp_path, tokenizer):
    """SFT data where some step has nothing to learn: 8 prompts longer than max_seq_len (no assistant token
    left) in a row. (path, that step's number in a run with --seed LONG_PROMPT_SEED)."""
    from dataset import SFTDataset
    long_prompt = {"messages": [{"role": "user", "content": "🙂" * 15}, {"role": "assistant", "content": "好"}]}
    records = insert_at(shipped_lines("sft_poetry.jsonl.gz", 250), {10 + i: long_prompt for i in range(8)})
    path = write_jsonl(tmp_path / "sft_long_prompt.jsonl", records)
    labels = [s["labels"] for s in SFTDataset(path, tokenizer, 64, batch_size=4, seed=LONG_PROMPT_SEED)]
    masked_batches = [b for b in range(len(labels) // 4)
                      if all((labels[i] == -100).all() for i in range(4 * b, 4 * b + 4))]
    assert masked_batches, "test set-up: no batch without assistant tokens"
    return path, masked_batches[0] + 1


def test_conversation_whose_answer_is_cut_off_is_not_a_non_finite_step(tmp_path, tokenizer, capfd):
    """A prompt longer than max_seq_len leaves no assistant token to learn. A batch of such samples has
    nothing to learn; it must not be reported as a non-finite loss (which counts toward --max_bad_steps
    and tells the user to lower the learning rate)."""
    path, step = long_prompt_run(tmp_path, tokenizer)
    assert run_main(train_argv(path, tmp_path / "out", "--max_steps", step, "--seed", LONG_PROMPT_SEED)) is None
    printed = capfd.readouterr()
    assert "non-finite" not in printed.out + printed.err, \
        f"step {step} (no assistant token within --max_seq_len) is reported as non-finite"


def test_a_step_with_nothing_to_learn_still_logs_evaluates_and_saves_when_due(tmp_path, tokenizer):
    path, step = long_prompt_run(tmp_path, tokenizer)
    out = tmp_path / "out"
    assert run_main(train_argv(path, out, "--max_steps", step + 1, "--log_interval", step, "--eval_interval", step,
                               "--save_interval", step, "--seed", LONG_PROMPT_SEED)) is None
    at_step = [r for r in read_metrics(out) if r["step"] == step]
    assert any("val_loss" in r for r in at_step), at_step
    assert any("tokens_per_sec" in r and "loss" not in r for r in at_step), at_step  # no loss: nothing trained
    assert (out / f"checkpoint-{step}" / "training_state.pt").is_file()


# --- up-front checks: one line, before any work ------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_without_chat_template(tmp_path_factory):
    from transformers import AutoTokenizer
    path = str(tmp_path_factory.mktemp("tok") / "no_template")
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.chat_template = None
    tok.save_pretrained(path)
    for name in ("chat_template.jinja", "chat_template.json"):
        if os.path.exists(os.path.join(path, name)):
            os.remove(os.path.join(path, name))
    assert not AutoTokenizer.from_pretrained(path).chat_template
    return path


UPFRONT = {
    "missing data file": (["--data_path", "{tmp}/nowhere.jsonl"], "nowhere.jsonl"),
    "missing tokenizer": (["--tokenizer_path", "{tmp}/no_such_tokenizer"], "no_such_tokenizer"),
    "no chat template": (["--data_path", "{sft}", "--tokenizer_path", "{no_template}"], "chat template"),
    "batch_size 0": (["--batch_size", "0"], "--batch_size"),
    "batch_size -2": (["--batch_size", "-2"], "--batch_size"),
    "max_steps 0": (["--max_steps", "0"], "--max_steps"),
    "max_steps -5": (["--max_steps", "-5"], "--max_steps"),
    "device tpu": (["--device", "tpu"], "tpu"),
    "device cuda without GPU": (["--device", "cuda"], "cuda"),
    "muon with fsdp": (["--optimizer", "muon", "--fsdp"], "--fsdp"),
    "decay_fraction 0": (["--lr_schedule", "wsd", "--decay_fraction", "0"], "--decay_fraction"),
}


@pytest.mark.parametrize("case", list(UPFRONT))
def test_wrong_setup_stops_with_one_line_before_any_work(case, tmp_path, pretrain_file, sft_file, base_model,
                                                         tokenizer_without_chat_template, capfd):
    if case == "device cuda without GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is available")
    extra, fragment = UPFRONT[case]
    fill = {"tmp": str(tmp_path), "sft": sft_file, "base": base_model, "no_template": tokenizer_without_chat_template}
    extra = [a.format(**fill) for a in extra]
    out = tmp_path / "out"
    code = run_main(["--data_path", pretrain_file, "--out_dir", out, *FAST, "--max_steps", "1", *extra])
    assert_one_line_error(code, capfd, fragment)
    assert not os.path.exists(out), "the run started working before the check"


def test_unknown_dtype_is_refused(tmp_path, pretrain_file, capfd):
    code = run_main(train_argv(pretrain_file, tmp_path / "out", "--dtype", "float8"))
    err = capfd.readouterr().err
    assert code not in (None, 0)
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "error:" in last and "--dtype" in last and "float8" in last, err
    assert not os.path.exists(tmp_path / "out")


# --- --init_from loads strictly --------------------------------------------------------------------

def edited_model(base, path, edit):
    from safetensors.torch import load_file, save_file
    shutil.copytree(base, path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return str(path)


Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
INIT_FROM_EDITS = {
    "missing weight": (lambda t: t.pop(Q_PROJ), ["missing", "wq"]),
    "unexpected weight": (lambda t: t.update({"model.layers.0.extra_adapter.weight": torch.zeros(4, 4)}),
                          ["unexpected", "extra_adapter"]),
    "wrong shape": (lambda t: t.update({Q_PROJ: torch.zeros(32, 64)}), ["cannot load"]),
}


@pytest.mark.parametrize("case", list(INIT_FROM_EDITS))
def test_init_from_with_weights_that_do_not_match_stops(case, tmp_path, sft_file, base_model, capfd):
    edit, fragments = INIT_FROM_EDITS[case]
    model = edited_model(base_model, tmp_path / "edited", edit)
    code = run_main(train_argv(sft_file, tmp_path / "out", "--max_steps", "1", "--init_from", model))
    assert_one_line_error(code, capfd, model, *fragments)
    assert not os.path.exists(tmp_path / "out")


def test_init_from_with_another_vocabulary_stops(tmp_path, sft_file, tokenizer, capfd):
    from model import Transformer
    model = str(tmp_path / "other_vocab")
    Transformer(tiny_config(len(tokenizer) + 16, max_seq_len=64)).save_pretrained(model)
    code = run_main(train_argv(sft_file, tmp_path / "out", "--max_steps", "1", "--init_from", model))
    assert_one_line_error(code, capfd, model, str(len(tokenizer) + 16), str(len(tokenizer)))
    assert not os.path.exists(tmp_path / "out")


def test_init_from_a_matching_model_trains(tmp_path, sft_file, base_model):
    """The control for the tests above: the unedited model loads and trains."""
    assert run_main(train_argv(sft_file, tmp_path / "out", "--max_steps", "1", "--init_from", base_model)) is None
