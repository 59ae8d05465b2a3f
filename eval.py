"""Evaluate a Tiny-LLM checkpoint with EleutherAI's lm-evaluation-harness (the `lm_eval` package).

    python eval.py --model runs/demo/base                       the bundled poetry suite (tasks/)
    python eval.py --model runs/demo/sft --chat                 the same, prompts in the chat format
    python eval.py --model runs/demo/base --data_path FILE      bits per byte on pretraining JSONL
    python eval.py --model DIR --tasks cmmlu,ceval-valid,arc_easy,hellaswag     any lm-eval task

A checkpoint is a Hugging Face Llama directory, so lm-eval's own `hf` model (HFLM) runs it and the numbers
are those of the `lm_eval` command line with `--model hf` (tested): no second harness to trust. The price
is that evaluation runs transformers' LlamaForCausalLM rather than model.py (the same logits, tested).

Bits per byte (`--data_path`): every document is scored on its own, as `<|endoftext|>` followed by its
tokens, the separator not predicted; documents longer than the model's context are scored in windows
(lm-eval's rolling log-likelihood). bpb = -sum log-likelihood / (ln 2 * sum of the documents' UTF-8 bytes).
"""
import argparse
import contextlib
import json
import logging
import math
import os
import socket
import sys

from corpus import DataError, parse_text, read_records
from tools import CALL, MAX_TOOL_CALLS, parse_tool_calls, tool_schemas

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
SUITE = "tiny_llm_poetry"  # the group of the bundled tasks (tasks/tiny_llm_poetry.yaml)
END_OF_TEXT = "<|endoftext|>"
DATA_TASK = "data_bpb"
CALL_ROOM = 128  # new tokens a turn gets at least with --tools: a call is about 70 on the demo tokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory written by train_model.py")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated lm-eval task or group names (default: {SUITE}, the bundled suite; "
                        "none with --data_path)")
    p.add_argument("--data_path", default=None, metavar="FILE",
                   help="pretraining-format JSONL (.jsonl or .jsonl.gz): report its bits per byte")
    p.add_argument("--limit", type=float, default=None,
                   help="at most this many items per task (a fraction below 1: that share of them)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--chat", action="store_true", help="apply the chat template to prompts (SFT models)")
    p.add_argument("--json", default=None, metavar="PATH", help="write all results, with standard errors")
    p.add_argument("--tools", default=None, metavar="NAMES",
                   help="with --chat: offer these built-in tools (search_poems) to the model, whose calls run "
                        "during generate_until tasks (greedy)")
    p.add_argument("--max_tool_calls", type=int, default=MAX_TOOL_CALLS, help="with --tools: calls per answer at most")
    return p.parse_args(argv)


class EvalError(Exception):
    """Bad input; main() prints it as one line."""


def check_model_dir(model_dir):
    """A directory written by train_model.py: HF Llama weights and a tokenizer with <|endoftext|>."""
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not os.path.isfile(os.path.join(model_dir, name)):
            raise EvalError(f"{model_dir} is not a Tiny-LLM model directory (no {name}); "
                            "pass a directory written by train_model.py")
    with open(os.path.join(model_dir, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    if model_type != "llama":
        raise EvalError(f"{model_dir}: model_type is {model_type!r}, not 'llama'; "
                        "pass a directory written by train_model.py")


def make_lm(model_dir, device, batch_size, tools=None, max_tool_calls=MAX_TOOL_CALLS):
    """lm-eval's HFLM on the checkpoint, with <|endoftext|> as the prefix of rolling log-likelihoods.

    Our tokenizers declare <|endoftext|> as bos (tokenizer.py), which HFLM would take anyway; model
    directories written before that declare none, and HFLM would then prefix documents with the eos
    token (<|im_end|>), which a base model never saw at the start of a document. Naming it serves both."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer
    check_model_dir(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    end_of_text = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    if end_of_text is None or end_of_text == tokenizer.unk_token_id:
        raise EvalError(f"{model_dir}: the tokenizer has no {END_OF_TEXT} token; "
                        "pass a directory written by train_model.py")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise EvalError(f"unknown --device {device!r}; use cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {device} asked for, but no CUDA GPU is available; use --device cpu")
    lm_class = HFLM if sys.stderr.isatty() else quiet(HFLM)
    if tools:
        lm_class = with_tools(lm_class, tools, model_dir, max_tool_calls)
    return lm_class(pretrained=model_dir, tokenizer=tokenizer, device=device, batch_size=batch_size,
                    prefix_token_id=end_of_text)


def with_tools(lm_class, names, model_dir, max_tool_calls):
    """lm_class whose chat prompts offer the built-in tools `names` and whose answers may call them: each
    batch of generate_until requests is answered greedily by rollout.sample_with_tools with model.py's
    model (calls run, their results go back, the model answers on, up to max_tool_calls times), cut at the
    request's stop strings, in the checkpoint's float32 like HFLM's own requests (no autocast).
    It counts, per task, the answers whose first turn called a tool and the calls that were valid (JSON
    naming one of the tools): `tool_use`."""
    from types import SimpleNamespace

    from model import Transformer
    from rollout import sample_with_tools
    schemas = tool_schemas(names)

    class WithTools(lm_class):
        def apply_chat_template(self, chat_history, add_generation_prompt=True):
            return self.tokenizer.apply_chat_template(chat_history, tools=schemas, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)

        def generate_until(self, requests, disable_tqdm=False):
            if not hasattr(self, "ours"):
                self.ours = Transformer.from_pretrained(model_dir).to(self.device).eval()
            stops = [self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|endoftext|>")]
            self.tool_use = getattr(self, "tool_use", {})
            answers = []
            for start in range(0, len(requests), self.batch_size):
                batch = requests[start:start + self.batch_size]
                prompts = [self.tokenizer(r.args[0], add_special_tokens=False)["input_ids"] for r in batch]
                settings = SimpleNamespace(max_new_tokens=max(batch[0].args[1].get("max_gen_toks", 256), CALL_ROOM),
                                           max_tool_calls=max_tool_calls, temperature=0, top_p=None)
                rollouts = sample_with_tools(self.ours, prompts, 1, settings, self.tokenizer, stops,
                                             contextlib.nullcontext(), set(names), greedy=True)
                for request, text, ids in zip(batch, rollouts.texts, rollouts.completion_ids):
                    cut = min([text.find(s) for s in request.args[1].get("until", []) if s in text] + [len(text)])
                    answers.append(text[:cut])
                    self.count_tool_use(request.task_name, ids, stops)
            return answers

        def count_tool_use(self, task, completion_ids, stops):
            first_turn = next((completion_ids[:i] for i, t in enumerate(completion_ids) if t in stops),
                              completion_ids)
            text = self.tokenizer.decode(first_turn, skip_special_tokens=True)
            blocks = len(CALL.findall(text))
            _, calls, _ = parse_tool_calls(text, set(names))
            use = self.tool_use.setdefault(task, {"answers": 0, "called": 0, "calls": 0, "valid_calls": 0})
            use["answers"] += 1
            use["called"] += blocks > 0
            use["calls"] += blocks
            use["valid_calls"] += len(calls)
    return WithTools


def quiet(lm_class):
    """lm_class without progress bars: in a log file (`bash train.sh > log 2>&1`) each redraw is a line.
    lm-eval's requests show theirs whatever TQDM_DISABLE says, unless asked with disable_tqdm."""
    class Quiet(lm_class):
        def loglikelihood(self, requests, disable_tqdm=False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm=False):
            return super().generate_until(requests, disable_tqdm=True)
    return Quiet


def data_task(path):
    """An lm-eval task config: bits per byte on the documents of a pretraining JSONL file.

    The file is read with the training code's reader (bad lines skipped and reported, DataError when no
    line is valid), and lm-eval scores the documents through its rolling log-likelihood."""
    from datasets import Dataset, DatasetDict
    if not os.path.isfile(path):
        raise EvalError(f"data file {path} does not exist; pass --data_path")
    texts = [text for _, text in read_records(path, parse_text, max_bad_fraction=1.0)]
    return {
        "task": DATA_TASK,
        "custom_dataset": lambda **_: DatasetDict({"test": Dataset.from_dict({"text": texts})}),
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [{"metric": "bits_per_byte"}, {"metric": "byte_perplexity"}],
        "metadata": {"version": 1.0, "data_path": path},
    }


def hub_reachable(timeout=3.0):
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def go_offline_unless_hub_reachable(names):
    """With no network, a dataset missing from the cache costs a minute of retries before it fails;
    offline mode fails at once. Hugging Face libraries read these variables when imported, so this
    runs first."""
    bundled = {os.path.splitext(name)[0] for name in os.listdir(TASKS_DIR) if name.endswith(".yaml")}
    already_offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if any(name not in bundled for name in names) and not already_offline and not hub_reachable():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def task_manager_for(names):
    """lm-eval's TaskManager with our tasks/ directory. Indexing lm-eval's own thousands of tasks takes
    about 10 s on a small CPU, so it is done only when a name is not one of ours."""
    from lm_eval.tasks import TaskManager
    ours = TaskManager(include_path=TASKS_DIR, include_defaults=False)
    if all(name in ours.task_index for name in names):
        return ours
    manager = TaskManager(include_path=TASKS_DIR)
    unknown = [name for name in names if name not in manager.task_index]
    if unknown:
        raise EvalError(f"unknown task(s) {', '.join(unknown)}; see `lm_eval ls tasks` for lm-eval's names "
                        f"and {TASKS_DIR} for the bundled ones")
    return manager


def evaluate(lm, tasks, data_path=None, limit=None, chat=False):
    """lm-eval's results dict (simple_evaluate) for task names and, given data_path, its bits per byte."""
    import lm_eval
    names = [t for t in tasks if t]
    manager = task_manager_for(names)
    specs = names + ([data_task(data_path)] if data_path else [])
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=manager, limit=limit,
                                       apply_chat_template=chat, log_samples=False, bootstrap_iters=1000)
    except AssertionError:
        # lm-eval asserts that every item fits the model's context.
        raise EvalError(f"an item of {', '.join(names)} is longer than the model's context of {lm.max_length} "
                        "tokens; evaluate a model with more positions (--max_seq_len 128 or more)")
    except ConnectionError as e:
        raise EvalError(f"a task's dataset is not in the Hugging Face cache and the Hub cannot be reached "
                        f"({' '.join(str(e).split())[:200]}); run once with a network, or set HF_HOME to "
                        "a cache that holds it")


def scores(results):
    """Rows {task, metric, value, stderr, n, chance} from lm-eval's results, one per task and metric;
    stderr is None where lm-eval gives none, chance comes from the task's metadata."""
    rows = []
    for task, metrics in results["results"].items():
        config = results.get("configs", {}).get(task, {})
        chance = (config.get("metadata") or {}).get("chance")
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if (metric.endswith("_stderr") or metric in ("alias", "sample_len")
                    or not isinstance(value, (int, float))):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append({"task": task, "metric": metric, "value": value,
                         "stderr": stderr if isinstance(stderr, (int, float)) else None, "n": n,
                         "chance": chance})
    return rows


def format_table(rows):
    lines = [f"{'task':<28} {'metric':<16} {'value':>8} {'stderr':>8} {'n':>6} {'chance':>7}"]
    for r in rows:
        stderr = f"{r['stderr']:.4f}" if r["stderr"] is not None and math.isfinite(r["stderr"]) else "-"
        chance = f"{r['chance']:.4f}" if r["chance"] is not None else "-"
        lines.append(f"{r['task']:<28} {r['metric']:<16} {r['value']:>8.4f} {stderr:>8} {r['n'] or '-':>6} "
                     f"{chance:>7}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-request notes drown the table
    if not sys.stderr.isatty():
        os.environ["TQDM_DISABLE"] = "1"  # the other progress bars (transformers loading the weights)
    tasks = args.tasks.split(",") if args.tasks is not None else ([] if args.data_path else [SUITE])
    go_offline_unless_hub_reachable(tasks)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    try:
        lm = make_lm(args.model, args.device, args.batch_size, args.tools.split(",") if args.tools else None,
                     args.max_tool_calls)
        results = evaluate(lm, tasks, args.data_path, limit, args.chat)
    except (EvalError, DataError) as e:
        sys.exit(f"error: {e}")
    rows = scores(results)
    print(format_table(rows))
    tool_use = getattr(lm, "tool_use", {})
    for task, use in sorted(tool_use.items()):
        print(f"{task} with {args.tools}: {use['called']} of {use['answers']} answers called a tool; "
              f"{use['valid_calls']} of {use['calls']} calls valid (JSON naming a tool)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "chat": args.chat, "limit": args.limit, "scores": rows,
                       "results": results["results"], "groups": results.get("groups", {}),
                       "n-samples": results.get("n-samples", {}), "versions": results.get("versions", {}),
                       "tool_use": tool_use},
                      f, indent=2, ensure_ascii=False, default=str)


if __name__ == "__main__":
    main()
