"""The GRPO race against TRL (python bench.py --trl_grpo MODEL_DIR): train_model.py --mode grpo against TRL's
GRPOTrainer, end to end, on the same chat model, prompts, rewards and settings: P prompts per step, G
completions each, at most L new tokens at temperature 1, the dapo loss, no KL, AdamW, N steps.

Completions per second count every completion of the N steps over the steps' wall time; rollout (sampling
and scoring) and update (the forward, backward and optimizer step) are timed apart: ours from its own
metrics (rollout_s, update_s), TRL's by timing its _generate_and_score_completions inside train(). The
completions differ (each side samples its own), so the report gives each side's mean completion length:
sampling time grows with it.

Before the race both sides compute the first step's loss on the same completions and rewards: ours sampled,
scored and given advantages by our code; TRL's _compute_loss gets them as its own inputs (prompts
left-padded, completions right-padded, with their masks). They must agree, as the tests check ours against
the objective computed from transformers' model.
"""
import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.common import format_row, machine, machine_summary, repo_path, row, stderr_log, table_header
from grpo import group_advantages, grpo_loss
from model import load_config
from modes import labelled_log_probs
from rewards import poem_form
from rollout import sample_completions

STEP_GOAL = 2.0  # minimum ratio of our completions/s to TRL's
PROMPTS = "data/poem_form_prompts.jsonl.gz"
SETTINGS = {"full": dict(prompts=4, generations=8, max_new_tokens=64, steps=6),
            "quick": dict(prompts=2, generations=4, max_new_tokens=8, steps=2)}


def shipped_prompts(count):
    with gzip.open(repo_path(PROMPTS), "rt", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(count), f)]


def ours(model_dir, data, settings, out_dir, log):
    """train_model.py --mode grpo in a process of its own (one torch thread): {seconds, rollout_s, update_s,
    completions, tokens} of its steps."""
    n = settings["prompts"]
    argv = [sys.executable, repo_path("train_model.py"), "--mode", "grpo", "--init_from", model_dir,
            "--tokenizer_path", model_dir, "--data_path", data, "--out_dir", out_dir, "--reward", "poem_form",
            "--batch_size", str(n), "--num_generations", str(settings["generations"]),
            "--max_new_tokens", str(settings["max_new_tokens"]), "--max_steps", str(settings["steps"]),
            "--learning_rate", "1e-5", "--warmup_iters", "1", "--optimizer", "adamw", "--lr_schedule", "cosine",
            "--log_interval", "1", "--eval_interval", "100000", "--eval_batches", "1", "--save_interval", "0",
            "--device", "cpu", "--dtype", "float32", "--max_seq_len", str(load_config(model_dir).max_seq_len)]
    log("ours: " + " ".join(argv[2:]))
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise RuntimeError(f"our GRPO run failed: {done.stderr.strip().splitlines()[-1:]}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "loss" in r]
    rollout, update = sum(r["rollout_s"] for r in steps), sum(r["update_s"] for r in steps)
    completions = len(steps) * n * settings["generations"]
    return {"seconds": rollout + update, "rollout_s": rollout, "update_s": update, "completions": completions,
            "mean_length": sum(r["completion_length"] for r in steps) / len(steps)}


def trl_trainer(model_dir, rows, settings, out_dir):
    """TRL's GRPOTrainer with the same settings, rewarded by our poem_form (TRL's convention is ours)."""
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    n, g = settings["prompts"], settings["generations"]
    config = trl.GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=n * g, num_generations=g,
        max_completion_length=settings["max_new_tokens"], max_steps=settings["steps"], learning_rate=1e-5,
        warmup_steps=1, lr_scheduler_type="cosine", adam_beta2=0.95, weight_decay=0.1, temperature=1.0, beta=0.0,
        loss_type="dapo", use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, seed=1337, shuffle_dataset=False)
    dataset = Dataset.from_list([{"prompt": r["messages"], "lines": r["lines"], "chars_per_line": r["chars_per_line"]}
                                 for r in rows])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return trl.GRPOTrainer(model=model, reward_funcs=[poem_form], args=config, train_dataset=dataset,
                           processing_class=AutoTokenizer.from_pretrained(model_dir))


def trl_race(trainer, settings):
    """TRL's N steps, timed: {seconds, rollout_s, update_s, completions, mean_length}."""
    generate, rollout = trainer._generate_and_score_completions, []

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = generate(*args, **kwargs)
        rollout.append(time.perf_counter() - start)
        return out
    trainer._generate_and_score_completions = timed
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    return {"seconds": seconds, "rollout_s": sum(rollout), "update_s": seconds - sum(rollout),
            "completions": settings["steps"] * settings["prompts"] * settings["generations"],
            "mean_length": sum(lengths) / max(len(lengths), 1)}


def first_losses(model_dir, trainer, rows, settings):
    """(ours, TRL's) loss of the first step on the same completions, rewards and advantages."""
    from transformers import AutoTokenizer
    from model import Transformer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = Transformer.from_pretrained(model_dir).eval()
    g = settings["generations"]
    args = argparse.Namespace(max_new_tokens=settings["max_new_tokens"], temperature=1.0, top_p=1.0)
    prompts = [tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"] for r in rows[:settings["prompts"]]]
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    torch.manual_seed(0)
    rollouts = sample_completions(model, prompts, g, args, tokenizer, stops, torch.autocast("cpu", enabled=False))
    rewards = torch.tensor(poem_form([[{"role": "assistant", "content": t}] for t in rollouts.texts],
                                     [r["lines"] for r in rows[:settings["prompts"]] for _ in range(g)],
                                     [r["chars_per_line"] for r in rows[:settings["prompts"]] for _ in range(g)]))
    batch = rollouts.training_rows(tokenizer.pad_token_id)
    batch["advantages"] = group_advantages(rewards, g, "group")
    tokens = sum(len(c) for c in rollouts.completion_ids)
    with torch.no_grad():
        log_probs = labelled_log_probs(model, batch["input_ids"], batch["labels"])
        ours = float(grpo_loss(log_probs, batch, tokens, "dapo", 0.2, 0.2, 0.0)[0])
        trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets before its steps
        theirs = float(trainer._compute_loss(trainer.model, trl_inputs(rollouts, batch["advantages"], tokenizer)))
    return ours, theirs


def trl_inputs(rollouts, advantages, tokenizer):
    """Our rollouts as GRPOTrainer's inputs: prompts left-padded, completions right-padded, with masks."""
    def padded(sequences, left):
        width = max(map(len, sequences))
        ids = torch.full((len(sequences), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, sequence in enumerate(sequences):
            span = slice(width - len(sequence), width) if left else slice(0, len(sequence))
            ids[i, span], mask[i, span] = torch.tensor(sequence), 1
        return ids, mask
    prompt_ids, prompt_mask = padded(rollouts.prompt_ids, left=True)
    completion_ids, completion_mask = padded(rollouts.completion_ids, left=False)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": advantages,
            "num_items_in_batch": completion_mask.sum()}


def bench_trl_grpo(args):
    import trl
    if not os.path.isfile(os.path.join(args.trl_grpo, "model.safetensors")):
        sys.exit(f"error: --trl_grpo {args.trl_grpo}: holds no model.safetensors; pass a chat model directory")
    settings, log = SETTINGS["quick" if args.quick else "full"], stderr_log()
    rows = shipped_prompts(settings["prompts"] * settings["steps"])
    results = {"machine": machine(torch.device("cpu")), "trl": trl.__version__, "model": args.trl_grpo,
               "settings": settings}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "prompts.jsonl")
        with open(data, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        trainer = trl_trainer(args.trl_grpo, rows, settings, os.path.join(tmp, "trl"))
        results["first_loss"] = first_losses(args.trl_grpo, trainer, rows, settings)
        log("ours: training")
        results["ours"] = ours(args.trl_grpo, data, settings, os.path.join(tmp, "ours"), log)
        log("TRL: training")
        results["trl_result"] = trl_race(trainer, settings)
    return results


def run(args):
    """The race; prints the table (or the JSON) and returns the results."""
    torch.set_num_threads(1)
    results = bench_trl_grpo(args)
    if args.json:
        print(json.dumps(results, indent=2))
        return results
    o, t, s = results["ours"], results["trl_result"], results["settings"]
    rows = [row("GRPO race", "completions end to end", "/s", o["completions"] / o["seconds"],
                t["completions"] / t["seconds"], t["seconds"] / o["seconds"], STEP_GOAL),
            row("GRPO race", "rollout (sample, score)", "s", o["rollout_s"], t["rollout_s"],
                t["rollout_s"] / o["rollout_s"]),
            row("GRPO race", "update (loss, backward, AdamW)", "s", o["update_s"], t["update_s"],
                t["update_s"] / o["update_s"])]
    ours_loss, trl_loss = results["first_loss"]
    print("\n".join([f"Tiny-LLM --mode grpo vs TRL {results['trl']} GRPOTrainer: "
                     f"{machine_summary(results['machine'])}; model {results['model']}", table_header(),
                     *map(format_row, rows),
                     f"{s['steps']} steps of {s['prompts']} prompts x {s['generations']} completions of at most "
                     f"{s['max_new_tokens']} tokens (mean: ours {o['mean_length']:.1f}, TRL {t['mean_length']:.1f}), "
                     "dapo loss, beta 0, temperature 1, one torch thread",
                     f"first step on the same completions and rewards: loss ours {ours_loss:.6f}, TRL {trl_loss:.6f}: "
                     f"same {abs(ours_loss - trl_loss) <= 1e-4 * max(1, abs(trl_loss))}"]))
    return results
