"""Evaluation: bits per byte in training and in eval.py against transformers' LlamaForCausalLM, eval.py
against lm-eval's own command line, the bundled tasks, and bad input."""
import glob
import json
import math
import os
import subprocess
import sys
from functools import partial

import pytest
import torch

from conftest import (REPO, SUBPROCESS_ENV, TINY_MODEL_ARGS, read_metrics, run_main, shipped_lines, write_jsonl,
                      write_tiny_model)

TASKS_DIR = os.path.join(REPO, "tasks")
CONTEXT = 128  # positions of the test model: the longest bundled item takes about 100 tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A complete model directory (weights, tokenizer) of the tiny architecture with CONTEXT positions."""
    return write_tiny_model(tmp_path_factory.mktemp("eval") / "model", tokenizer, max_seq_len=CONTEXT)


run_eval = partial(run_main, module="eval")  # eval.main(argv) in this process: the SystemExit message, or None


def hf_nll(hf_model, ids):
    """Negative log-likelihood (nats) of ids[1:] given the ids before each, from LlamaForCausalLM."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits.double(), torch.tensor(ids[1:]), reduction="none")


# --- bits per byte in training ---------------------------------------------------------------------

def test_token_byte_lengths_add_up_to_the_texts_utf8_bytes(tokenizer):
    from modes import token_byte_lengths
    table = token_byte_lengths(tokenizer)
    texts = [r["text"] for r in shipped_lines("pretrain_poetry.jsonl.gz", 300)] + ["emoji 🎉 and ｆｕｌｌ-width　space"]
    partial = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert int(table[ids].sum()) == len(text.encode("utf-8")), text
        partial += sum("\ufffd" in tokenizer.decode([i]) for i in ids)
    assert partial > 0  # tokens that hold part of a character occur, and are counted right
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"):
        assert table[tokenizer.convert_tokens_to_ids(token)] == 0


def test_pretrain_val_bpb_equals_llama_for_causal_lm(tmp_path, tokenizer):
    """val_bpb over the validation blocks equals bpb from transformers on the saved model: every 200th
    document, each followed by <|endoftext|>, packed into blocks of 64 tokens; <|endoftext|> targets
    count neither loss nor bytes."""
    from transformers import LlamaForCausalLM
    from modes import token_byte_lengths
    records = shipped_lines("pretrain_poetry.jsonl.gz", 2000)
    data = write_jsonl(tmp_path / "pretrain.jsonl", records)
    out = tmp_path / "out"
    assert run_main(["--out_dir", out, "--data_path", data, *TINY_MODEL_ARGS, "--batch_size", "4",
                     "--max_steps", "2", "--eval_interval", "2", "--eval_batches", "2",
                     "--save_interval", "0"]) is None
    logged = [r for r in read_metrics(out) if "val_bpb" in r][-1]
    assert {"tokens", "elapsed_s", "val_loss"} <= set(logged)

    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    stream = []
    for record in records[199::200]:
        stream += tokenizer(record["text"], add_special_tokens=False)["input_ids"] + [end_of_text]
    blocks = [stream[i:i + 64] for i in range(0, len(stream) - 63, 64)][:2 * 4]
    hf = LlamaForCausalLM.from_pretrained(str(out)).eval()
    table = token_byte_lengths(tokenizer)
    nll_all = nll_text = n_bytes = count = 0.0
    for block in blocks:
        nll = hf_nll(hf, block)
        targets = torch.tensor(block[1:])
        text = targets != end_of_text
        nll_all += float(nll.sum())
        count += len(targets)
        nll_text += float(nll[text].sum())
        n_bytes += int(table[targets].sum())
    assert logged["val_loss"] == pytest.approx(nll_all / count, rel=1e-5)
    assert logged["val_bpb"] == pytest.approx(nll_text / (math.log(2) * n_bytes), rel=1e-5)


def test_sft_val_bpb_equals_llama_for_causal_lm(tmp_path, tokenizer):
    """In SFT the predicted tokens are the assistant's; their bytes are the answers' UTF-8 bytes (counted
    from the raw text here) and <|im_end|> counts none."""
    from transformers import LlamaForCausalLM
    short = [r for r in shipped_lines("sft_poetry.jsonl.gz", 2000)
             if len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) <= 120]
    records = short[:1000]
    data = write_jsonl(tmp_path / "sft.jsonl", records)
    out = tmp_path / "out"
    assert run_main(["--out_dir", out, "--data_path", data, *TINY_MODEL_ARGS, "--max_seq_len", "128",
                     "--batch_size", "4", "--max_steps", "2", "--eval_interval", "2",
                     "--save_interval", "0"]) is None
    logged = [r for r in read_metrics(out) if "val_bpb" in r][-1]

    hf = LlamaForCausalLM.from_pretrained(str(out)).eval()
    nll_all = nll_text = n_bytes = count = 0.0
    for record in records[199::200]:
        encoded = tokenizer.apply_chat_template(record["messages"], tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        ids, mask = encoded["input_ids"], torch.tensor(encoded["assistant_masks"][1:], dtype=torch.bool)
        nll = hf_nll(hf, ids)
        text = mask & (torch.tensor(ids[1:]) != tokenizer.eos_token_id)
        nll_all += float(nll[mask].sum())
        count += int(mask.sum())
        nll_text += float(nll[text].sum())
        n_bytes += sum(len(m["content"].encode("utf-8")) for m in record["messages"] if m["role"] == "assistant")
    assert logged["val_loss"] == pytest.approx(nll_all / count, rel=1e-5)
    assert logged["val_bpb"] == pytest.approx(nll_text / (math.log(2) * n_bytes), rel=1e-5)


# --- eval.py ---------------------------------------------------------------------------------------

def test_data_path_bpb_equals_llama_for_causal_lm(tmp_path, model_dir, tokenizer):
    """Each document scored on its own after <|endoftext|>; one longer than the model's context is
    scored in windows of CONTEXT predicted tokens. A bad line is skipped; the bytes are the texts' own."""
    from transformers import LlamaForCausalLM
    texts = [r["text"] for r in shipped_lines("pretrain_poetry.jsonl.gz", 12)]
    texts.append("\n".join(texts[:6]))  # about 300 tokens: three windows
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts] + ["{not json"])
    out = tmp_path / "results.json"
    assert run_eval(["--model", model_dir, "--data_path", data, "--json", out, "--batch_size", "4"]) is None
    with open(out) as f:
        reported = {r["metric"]: r["value"] for r in json.load(f)["scores"]}

    hf = LlamaForCausalLM.from_pretrained(model_dir).eval()
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    nll = 0.0
    for text in texts:
        ids = [end_of_text] + tokenizer(text, add_special_tokens=False)["input_ids"]
        # Windows predict CONTEXT tokens each; the last, shorter one sees as many earlier tokens as fit.
        for start in range(1, len(ids), CONTEXT):
            end = min(start + CONTEXT, len(ids))
            nll += float(hf_nll(hf, ids[max(0, end - CONTEXT - 1):end])[-(end - start):].sum())
    assert len(tokenizer(texts[-1])["input_ids"]) > 2 * CONTEXT
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert reported["bits_per_byte"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)


def scores_by_task(rows):
    return {(r["task"], r["metric"]): r["value"] for r in rows}


@pytest.mark.slow
def test_eval_equals_the_lm_eval_command_line(tmp_path, model_dir, tokenizer):
    """The same checkpoint and task files through `lm_eval run --model hf`, with <|endoftext|> as the
    prefix of empty contexts as eval.py passes it (acc_mutual_info scores each line after it alone):
    the same numbers. (One run: the command line indexes all of lm-eval's tasks, 10-20 s on a small CPU.)"""
    tasks = "poetry_author,poetry_next_line,poetry_author_chat"
    ours = tmp_path / "ours.json"
    assert run_eval(["--model", model_dir, "--tasks", tasks, "--limit", "12", "--batch_size", "8",
                     "--device", "cpu", "--json", ours]) is None
    with open(ours) as f:
        our_results = json.load(f)["results"]
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    command = ["lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={model_dir},prefix_token_id={end_of_text}",
               "--include_path", TASKS_DIR, "--tasks", tasks, "--limit", "12", "--batch_size", "8",
               "--device", "cpu", "--output_path", str(tmp_path / "cli")]
    done = subprocess.run(command, cwd=tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [path] = glob.glob(str(tmp_path / "cli" / "**" / "results_*.json"), recursive=True)
    with open(path) as f:
        cli_results = json.load(f)["results"]
    for task in tasks.split(","):
        metrics = {k: v for k, v in cli_results[task].items() if isinstance(v, float)}
        assert metrics, cli_results[task]
        for key, value in metrics.items():
            assert our_results[task][key] == pytest.approx(value, abs=1e-9), (task, key)


def test_bundled_tasks_are_big_enough_and_held_out():
    """Each task has enough items for a standard error of at most 2.5 points at any accuracy, four
    options with one right answer, and no line of an item's poem in a shipped training file."""
    shipped = set()  # every line of every poem and message in the shipped files
    for name in ("pretrain_poetry.jsonl.gz", "sft_poetry.jsonl.gz", "sft_poetry_belle.jsonl.gz"):
        for record in shipped_lines(name, None):
            texts = [record["text"]] if "text" in record else [
                turn.get("content", turn.get("value")) for turn in record.get("messages", record.get("conversations"))]
            shipped.update(line for text in texts for line in text.split("\n"))
    for name in ("poetry_author", "poetry_next_line", "poetry_author_chat"):
        with open(os.path.join(TASKS_DIR, f"{name}.jsonl"), encoding="utf-8") as f:
            items = [json.loads(line) for line in f]
        assert 100 * math.sqrt(0.25 / len(items)) <= 2.5, name
        for item in items:
            if "choices" in item:
                assert len(set(item["choices"])) == 4 and 0 <= item["label"] < 4
        if name == "poetry_author":
            lines = [line for item in items for line in item["poem"].split("\n")]
        elif name == "poetry_next_line":
            lines = [item["choices"][item["label"]] for item in items]
        else:
            lines = [item["first_line"] for item in items]
        assert not [line for line in lines if line in shipped]


# --- bad input -------------------------------------------------------------------------------------

def test_a_directory_that_is_not_our_model(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    error = run_eval(["--model", tmp_path, "--limit", "1"])
    assert error.startswith("error: ") and "not a Tiny-LLM model directory" in error and "\n" not in error


@pytest.mark.slow
def test_unknown_task(model_dir):
    error = run_eval(["--model", model_dir, "--tasks", "poetry_author,no_such_task", "--limit", "1"])
    assert error.startswith("error: unknown task(s) no_such_task") and "\n" not in error


def test_data_file_with_no_valid_line(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "bad.jsonl", ["{not json", {"text": ""}, {"content": "x"}])
    error = run_eval(["--model", model_dir, "--data_path", data])
    assert error.startswith("error: ") and "bad.jsonl" in error and "no valid" in error and "\n" not in error


@pytest.mark.slow
def test_task_whose_dataset_is_not_cached_with_no_network(tmp_path, model_dir):
    env = {**SUBPROCESS_ENV, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), "--model", model_dir,
                           "--tasks", "arc_easy", "--limit", "1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "not in the Hugging Face cache" in last


@pytest.mark.slow
def test_a_log_file_gets_the_table_without_progress_bars(tmp_path, model_dir):
    """`bash train.sh > log 2>&1`: each redraw of a progress bar would be a line of the log."""
    with open(tmp_path / "log", "w") as log:
        done = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), "--model", model_dir, "--tasks",
                               "poetry_author,poetry_author_chat", "--limit", "4", "--device", "cpu"],
                              stdout=log, stderr=subprocess.STDOUT, env=SUBPROCESS_ENV, timeout=600)
    printed = (tmp_path / "log").read_text()
    assert done.returncode == 0, printed[-3000:]
    assert "poetry_author_chat" in printed and "exact_match" in printed
    assert "it/s]" not in printed and "%|" not in printed, printed[:2000]
