"""--mode grpo: the loss against an independent computation from transformers' LlamaForCausalLM, the
advantages, the clip, the reward convention (TRL's) and its errors, exact resume, LoRA and DDP."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SUBPROCESS_ENV, TINY_MODEL_ARGS, logged_steps, run_and_resume, run_main, write_jsonl

FORMS = [(4, 5, "五言绝句"), (4, 7, "七言绝句"), (8, 5, "五言律诗"), (8, 7, "七言律诗")]
TITLES = ["春", "秋思", "江上", "夜雨", "山居", "送别", "登高", "月夜", "梅花", "归雁", "雪", "渔父"]


def prompt_rows(count, conversational=True):
    rows = []
    for i in range(count):
        lines, chars, name = FORMS[i % 4]
        text = f"请写一首{name}，题目是《{TITLES[i % len(TITLES)]}》。"
        prompt = {"messages": [{"role": "user", "content": text}]} if conversational else {"prompt": text}
        rows.append({**prompt, "lines": lines, "chars_per_line": chars, "row": i})
    return rows


@pytest.fixture
def prompt_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(400))


GRPO = [*TINY_MODEL_ARGS, "--mode", "grpo", "--reward", "poem_form", "--batch_size", "2", "--num_generations", "4",
        "--max_new_tokens", "12", "--log_interval", "1", "--eval_interval", "1000", "--eval_batches", "1",
        "--save_interval", "0", "--learning_rate", "1e-3", "--warmup_iters", "1"]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# --- the objective, against transformers -------------------------------------------------------------------

def hf_token_log_probs(hf, prompt, completion):
    """log p of each completion token, one sequence at a time, through LlamaForCausalLM (no padding)."""
    ids = torch.tensor([prompt + completion])
    log_probs = torch.log_softmax(hf(ids).logits[0].float(), dim=-1)
    return torch.stack([log_probs[len(prompt) + t - 1, token] for t, token in enumerate(completion)])


def paper_objective(token_log_probs, old, reference, advantages, loss_type, epsilon, epsilon_high, beta,
                    max_new_tokens):
    """The GRPO objective written out per completion (lists of 1-D tensors), as DeepSeekMath's paper and
    TRL's documentation state it for each normalisation."""
    losses, lengths = [], []
    for logp, old_logp, ref_logp, advantage in zip(token_log_probs, old, reference, advantages):
        ratio = torch.exp(logp - old_logp)
        surrogate = torch.minimum(ratio * advantage, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * advantage)
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        losses.append(-surrogate + beta * kl)
        lengths.append(len(logp))
    if loss_type == "grpo":
        return sum(loss.mean() for loss in losses) / len(losses)
    if loss_type == "dapo":
        return sum(loss.sum() for loss in losses) / sum(lengths)
    return sum(loss.sum() for loss in losses) / (len(losses) * max_new_tokens)  # dr_grpo


@pytest.mark.parametrize("loss_type,beta", [("dapo", 0.0), ("grpo", 0.0), ("dr_grpo", 0.0), ("dapo", 0.04),
                                            ("grpo", 0.04)])
def test_loss_and_gradient_equal_the_objective_from_transformers(loss_type, beta, base_model, tmp_path):
    """Completions of different lengths (so that the normalisations differ), an old policy that is not the
    current one (so that ratios differ from 1 and the clip acts on some tokens), a reference that differs
    too: our loss and every gradient equal the objective computed from LlamaForCausalLM."""
    from transformers import LlamaForCausalLM
    from grpo import grpo_loss
    from model import Transformer, to_hf_name
    from modes import per_token_log_probs
    from rollout import Rollouts
    g = torch.Generator().manual_seed(3)
    prompts = [[5, 9, 100, 37], [5, 9, 100, 37], [44, 8, 12], [44, 8, 12]]
    completions = [torch.randint(6000, (n,), generator=g).tolist() for n in (6, 3, 9, 1)]
    advantages = torch.tensor([1.2, -0.7, 0.4, -0.9])
    old = [torch.randn(len(c), generator=g) * 0.3 - 6 for c in completions]
    reference = [torch.randn(len(c), generator=g) * 0.3 - 6 for c in completions]
    epsilon, epsilon_high, max_new_tokens = 0.2, 0.28, 12

    policy = Transformer.from_pretrained(base_model)
    batch = Rollouts(prompts, completions, [False] * 4, [""] * 4).training_rows(pad_id=0)
    width = batch["labels"].shape[1] - 1
    batch["advantages"] = advantages
    batch["old_log_probs"], batch["reference_log_probs"] = torch.zeros(4, width), torch.zeros(4, width)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        span = slice(len(prompt) - 1, len(prompt) - 1 + len(completion))
        batch["old_log_probs"][row, span], batch["reference_log_probs"][row, span] = old[row], reference[row]
    items = {"dapo": sum(map(len, completions)), "grpo": 4, "dr_grpo": 4 * max_new_tokens}[loss_type]
    log_probs = per_token_log_probs(policy(batch["input_ids"]).logits, batch["labels"])
    loss, (clipped, _, tokens) = grpo_loss(log_probs, batch, items, loss_type, epsilon, epsilon_high, beta)
    loss.backward()

    hf = LlamaForCausalLM.from_pretrained(base_model)
    expected = paper_objective([hf_token_log_probs(hf, p, c) for p, c in zip(prompts, completions)], old,
                               reference, advantages, loss_type, epsilon, epsilon_high, beta, max_new_tokens)
    expected.backward()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert 0 < clipped < tokens == sum(map(len, completions))  # the clip acted on some tokens, not all
    theirs = dict(hf.named_parameters())
    for name, param in policy.named_parameters():
        if name != "output.weight":  # tied: tok_embeddings' gradient holds both
            torch.testing.assert_close(param.grad, theirs[to_hf_name(name)].grad, atol=1e-6, rtol=1e-4, msg=name)


def test_log_probs_of_the_labelled_positions_only_equal_those_of_the_full_logits(base_model):
    """labelled_log_probs runs the output head only where a labelled token comes next: the same values and
    gradients as per_token_log_probs of every position's logits."""
    from model import Transformer
    from modes import labelled_log_probs, per_token_log_probs
    from rollout import Rollouts
    batch = Rollouts([[5, 9, 100], [44, 8]], [[7, 8, 9], [10, 11, 12, 13]], [False] * 2, [""] * 2).training_rows(0)
    results = []
    for fast in (True, False):
        model = Transformer.from_pretrained(base_model)
        log_probs = labelled_log_probs(model, batch["input_ids"], batch["labels"]) if fast else \
            per_token_log_probs(model(batch["input_ids"]).logits, batch["labels"])
        (log_probs * torch.arange(1.0, log_probs.shape[1] + 1)).sum().backward()
        results.append((log_probs.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-6)
    for fast, full in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(fast, full, atol=1e-6, rtol=1e-5)


def test_advantages_are_rewards_against_their_group():
    from grpo import group_advantages
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0, 1.0, float("nan"), 3.0, 2.0])
    advantages = group_advantages(rewards, 4, "group")
    first = rewards[:4]
    torch.testing.assert_close(advantages[:4], (first - first.mean()) / (first.std() + 1e-4))
    assert advantages[4:8].abs().max() == 0  # equal rewards: no signal
    scored = torch.tensor([1.0, 3.0, 2.0])  # a completion no function scored is left out of its group
    torch.testing.assert_close(advantages[[8, 10, 11]], (scored - scored.mean()) / (scored.std() + 1e-4))
    assert advantages[9] == 0
    torch.testing.assert_close(group_advantages(rewards, 4, "none")[:4], first - first.mean())


def test_a_group_with_equal_rewards_gives_no_gradient(base_model):
    from grpo import grpo_loss, group_advantages
    from model import Transformer
    from modes import per_token_log_probs
    from rollout import Rollouts
    policy = Transformer.from_pretrained(base_model)
    batch = Rollouts([[5, 9, 100]] * 4, [[7, 8, 9], [10], [11, 12], [13, 14, 15, 16]], [False] * 4,
                     [""] * 4).training_rows(pad_id=0)
    batch["advantages"] = group_advantages(torch.tensor([0.5] * 4), 4, "group")
    loss, _ = grpo_loss(per_token_log_probs(policy(batch["input_ids"]).logits, batch["labels"]), batch, 10,
                        "dapo", 0.2, 0.2, 0.0)
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in policy.parameters())


# --- rewards -----------------------------------------------------------------------------------------------

def test_poem_form_on_written_poems():
    from rewards import poem_form
    quatrain = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
    assert poem_form([quatrain], [4], [5]) == [1.0]
    assert poem_form([[{"role": "assistant", "content": quatrain}]], [4], [5]) == [1.0]  # conversational
    assert poem_form([quatrain], [4], [7]) == [0.0]  # four lines, none of seven characters
    assert poem_form([quatrain], [8], [5]) == [0.5 * 0.5]  # half the lines, those of the right length
    assert poem_form([quatrain + "\n春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。"], [4], [5]) == [0.5]  # eight, not 4
    assert poem_form(["床前明月光，疑是地上霜。"], [4], [5]) == [0.5 * 0.5]
    assert poem_form(["好的。"], [4], [5]) == [0.0]  # one line, of the wrong length
    assert poem_form([""], [4], [5]) == [0.0]
    assert poem_form(["春春春晚晚，春春晚春春。春春春晚晚，晚春春晚晚。"], [4], [5]) == [0.0]  # few distinct
    eight = "国破山河在，城春草木深。感时花溅泪，恨别鸟惊心。烽火连三月，家书抵万金。白头搔更短，浑欲不胜簪。"
    assert poem_form([eight], [8], [5]) == [1.0]


def test_poem_rhyme_on_written_poems():
    from rewards import poem_rhyme, rhyme_class
    assert [rhyme_class(c) for c in "霜乡光诗池知衣"] == ["唐", "唐", "唐", "支", "支", "支", "齐"]
    assert poem_rhyme(["床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"], [4]) == [1.0]  # 霜 乡: 唐
    assert poem_rhyme(["白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。"], [4]) == [1.0]  # 流 楼: 尤
    assert poem_rhyme(["床前明月光，疑是地上霜。\n举头望明月，低头思故里。"], [4]) == [0.0]  # 里: 齐
    assert poem_rhyme(["床前明月光，疑是地上霜。\n举头望明月，低头见白霜。"], [4]) == [0.0]  # 霜 twice: 重韵
    eight = "空山新雨后，天气晚来秋。明月松间照，清泉石上流。竹喧归浣女，莲动下渔舟。随意春芳歇，王孙自可留。"
    assert poem_rhyme([eight], [8]) == [1.0]  # 秋 流 舟 留: 尤
    drifted = "国破山河在，城春草木深。感时花溅泪，恨别鸟惊心。烽火连三月，家书抵万金。白头搔更短，浑欲不胜簪。"
    assert poem_rhyme([drifted], [8]) == [pytest.approx(2 / 3)]  # 深 心 金 rhyme today, 簪 (zān) no longer
    half = "空山新雨后，天气晚来秋。明月松间照，清泉石上流。"
    assert poem_rhyme([half], [8]) == [pytest.approx(1 / 3)]  # lines 6 and 8 missing
    assert poem_rhyme(["春春春晚晚，春春晚春春。春春春晚晚，晚春春晚晚。"], [4]) == [0.0]  # few distinct characters


def test_poem_rhyme_on_the_corpus():
    """Most regular poems of the shipped sample rhyme by this rule (classical rhymes drifted); even lines
    drawn from other poems of the same form rarely do."""
    import gzip
    import random
    from rewards import poem_lines, rhyme_score
    regular = []
    with gzip.open(os.path.join(REPO, "data", "pretrain_poetry.jsonl.gz"), "rt", encoding="utf-8") as f:
        for line in f:
            lines = poem_lines(json.loads(line)["text"].partition("\n")[2])
            if len(lines) in (4, 8) and len({len(x) for x in lines}) == 1 and len(lines[0]) in (5, 7):
                regular.append(lines)
    assert len(regular) > 9000
    rhyming = sum(rhyme_score(lines, len(lines)) == 1.0 for lines in regular) / len(regular)
    assert 0.68 < rhyming < 0.78, rhyming  # measured: 73%
    rng = random.Random(0)
    for size, at_most in ((4, 0.14), (8, 0.01)):  # measured: 10.5% and 0.13%
        pool = [lines for lines in regular if len(lines) == size]
        shuffled = []
        for _ in range(3000):
            lines = list(rng.choice(pool))
            for i in range(1, size, 2):
                lines[i] = rng.choice(pool)[i]
            shuffled.append(rhyme_score(lines, size) == 1.0)
        assert sum(shuffled) / len(shuffled) < at_most


RECORDING_REWARD = '''
import json, os

def length(prompts, completions, completion_ids, **columns):
    with open(os.environ["REWARD_LOG"], "a") as f:
        f.write(json.dumps({"prompts": prompts, "completions": completions, "completion_ids": completion_ids,
                            "columns": columns}, ensure_ascii=False) + "\\n")
    return [float(len(ids)) if i % 3 else None for i, ids in enumerate(completion_ids)]
'''


@pytest.mark.parametrize("conversational", [True, False], ids=["messages", "prompt"])
def test_a_users_reward_gets_trls_arguments_and_every_column(conversational, base_model, tmp_path, monkeypatch):
    reward = tmp_path / "my_reward.py"
    reward.write_text(RECORDING_REWARD)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("REWARD_LOG", str(log))
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(400, conversational))
    out = tmp_path / "out"
    assert run_main(["--data_path", data, "--out_dir", out, "--init_from", base_model, *GRPO, "--max_steps", "1",
                     "--reward", f"{reward}:length,poem_form", "--reward_weights", "0.5,1"]) is None
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    call = calls[1]  # the first training call (the first scored the held-out prompts, before training)
    assert len(call["prompts"]) == len(call["completions"]) == len(call["completion_ids"]) == 8  # 2 prompts x 4
    for name in ("lines", "chars_per_line", "row"):
        values = call["columns"][name]
        assert len(values) == 8 and values[:4] == [values[0]] * 4 and values[4:] == [values[4]] * 4, name
    if conversational:
        assert call["prompts"][0][-1]["role"] == "user"
        assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in call["completions"])
    else:
        assert isinstance(call["prompts"][0], str) and all(isinstance(c, str) for c in call["completions"])
    step = logged_steps(out)[1]
    assert {"reward", "reward_std", "rewards/length", "rewards/poem_form", "frac_reward_zero_std",
            "completion_length", "truncated", "clip_fraction", "rollout_s", "update_s"} <= set(step)
    scored = [float(len(ids)) for i, ids in enumerate(call["completion_ids"]) if i % 3]
    assert step["rewards/length"] == pytest.approx(sum(scored) / len(scored), abs=1e-5)  # None left out


BAD_REWARDS = {
    "raises": ("def f(completions, **kw):\n    raise ValueError('no poem here')\n", "raised ValueError: no poem here"),
    "wrong length": ("def f(completions, **kw):\n    return [1.0]\n", "returned 1 values for 2 completions"),
    "not a number": ("def f(completions, **kw):\n    return ['good'] * len(completions)\n",
                     "returned 'good' for completion 0: not a finite number or None"),
    "not a list": ("def f(completions, **kw):\n    return 1.0\n", "returned float for 2 completions"),
}


@pytest.mark.parametrize("case", list(BAD_REWARDS))
def test_a_bad_reward_stops_with_one_line_naming_it_and_the_step(case, base_model, prompt_file, tmp_path):
    """Its first call scores the greedy answers to the held-out prompts, before step 1 (2 of them here)."""
    code, message = BAD_REWARDS[case]
    reward = tmp_path / "bad.py"
    reward.write_text(code)
    error = run_main(["--data_path", prompt_file, "--out_dir", tmp_path / "out", "--init_from", base_model, *GRPO,
                      "--max_steps", "3", "--reward", f"{reward}:f", "--eval_batches", "2"])
    assert error == f"error: reward f at step 0 (evaluation) {message}", error


@pytest.mark.parametrize("spec,message", [("missing.py:f", "--reward missing.py:f: no file missing.py"),
                                          ("no_such_reward", "not a built-in reward"),
                                          ("REWARD:nothing", "has no function nothing")])
def test_a_reward_that_cannot_be_loaded_stops_before_training(spec, message, base_model, prompt_file, tmp_path):
    reward = tmp_path / "r.py"
    reward.write_text("def something(completions, **kw):\n    return [0.0] * len(completions)\n")
    error = run_main(["--data_path", prompt_file, "--out_dir", tmp_path / "out", "--init_from", base_model, *GRPO,
                      "--max_steps", "1", "--reward", spec.replace("REWARD", str(reward))])
    assert isinstance(error, str) and message in error, error
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


FAILING_AT_STEP_3 = '''
def f(completions, **kw):
    f.calls = getattr(f, "calls", 0) + 1
    if f.calls > 3:  # the held-out call, then steps 1 and 2
        raise RuntimeError("broken")
    return [float(len(c[0]["content"])) for c in completions]
'''


def test_a_reward_failing_mid_run_names_the_step_and_leaves_the_checkpoints(base_model, prompt_file, tmp_path):
    reward = tmp_path / "late.py"
    reward.write_text(FAILING_AT_STEP_3)
    out = tmp_path / "out"
    error = run_main(["--data_path", prompt_file, "--out_dir", out, "--init_from", base_model, *GRPO,
                      "--max_steps", "5", "--reward", f"{reward}:f", "--save_interval", "1"])
    assert error == "error: reward f at step 3 raised RuntimeError: broken", error
    assert sorted(os.listdir(out / "checkpoint-2")) and (out / "checkpoint-2" / "training_state.pt").is_file()


# --- runs ----------------------------------------------------------------------------------------------------

def test_with_several_iterations_the_clip_engages(base_model, prompt_file, tmp_path):
    """--num_iterations 3: the first update from a batch of rollouts has ratio 1 (nothing to clip), the next
    ones move away from the sampling policy and the clip holds some tokens."""
    out = tmp_path / "out"
    reward = tmp_path / "varied.py"  # a signal in every group: a tiny model's completions differ in it
    reward.write_text("def varied(completions, **_):\n"
                      "    return [len(set(c if isinstance(c, str) else c[0]['content'])) for c in completions]\n")
    assert run_main(["--data_path", prompt_file, "--out_dir", out, "--init_from", base_model, *GRPO,
                     "--max_steps", "6", "--num_iterations", "3", "--learning_rate", "3e-2", "--epsilon", "0.05",
                     "--reward", f"{reward}:varied"]) is None
    steps = logged_steps(out)
    assert [steps[s]["clip_fraction"] for s in (1, 4)] == [0, 0]
    assert max(steps[s]["clip_fraction"] for s in (2, 3, 5, 6)) > 0
    assert all(steps[s]["rollout_s"] > 0 for s in (1, 4)) and all(steps[s]["rollout_s"] == 0 for s in (2, 3, 5, 6))


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--num_iterations", "2", "--beta", "0.05"], ["--lora_rank", "4"]],
                         ids=["plain", "iterations-kl", "lora"])
def test_resume_equals_the_uninterrupted_run(extra, base_model, prompt_file, tmp_path):
    """Resumed from the checkpoint of step 3: steps 4-6 sample the same completions (the sampling RNG depends
    only on the seed and the step) and log the same losses and rewards; with --num_iterations 2 the resumed
    run reuses the rollouts of step 3 that the checkpoint saved."""
    args = ["--data_path", prompt_file, "--init_from", base_model, *GRPO, "--max_steps", "6", "--save_interval", "3",
            *extra]
    a, b = run_and_resume(args, tmp_path, "checkpoint-3")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert set(a[step]) == set(b[step])
        compared = {"loss", "reward", "completion_length", "grad_norm", "clip_fraction", "kl"} & set(a[step])
        assert "loss" in compared and ("kl" in compared) == ("--beta" in extra)
        for key in compared:  # steps reusing rollouts log no reward: they sampled nothing
            assert b[step][key] == pytest.approx(a[step][key], abs=1e-6), (step, key)
    assert "reward" in a[5] and ("reward" in a[4]) == ("--num_iterations" not in extra)


@pytest.mark.slow
def test_two_processes_train_and_each_samples_its_own_groups(base_model, prompt_file, tmp_path):
    out = tmp_path / "out"
    argv = ["--data_path", prompt_file, "--out_dir", str(out), "--init_from", base_model, *GRPO, "--max_steps", "2"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(REPO, "train_model.py"), *map(str, argv)], cwd=REPO, env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = logged_steps(out)
    assert sorted(steps) == [1, 2] and all(math.isfinite(s["loss"]) for s in steps.values())
    assert "2 process(es)" in done.stdout and "4 samples" in done.stdout  # 2 prompts on each of 2 processes


# --- the demo's data -----------------------------------------------------------------------------------------

def test_the_shipped_form_data_keeps_its_held_out_requests_held_out():
    """build_rl_data.py's files: SFT answers are rhyming poems of the form asked for (the second pass's file
    holds the demo SFT's form requests alone); the held-out requests' titles are in no training file and
    their phrasings in no training prompt."""
    import gzip
    from build_rl_data import FORMS, HELD_OUT_PHRASINGS, TRAIN_PHRASINGS
    from rewards import poem_form, poem_rhyme

    def rows(name):
        with gzip.open(os.path.join(REPO, "data", name), "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    import re
    frames = [re.compile(re.escape(p).replace(r"\{form\}", "(.+)").replace(r"\{title\}", "(.+)") + "$")
              for p in TRAIN_PHRASINGS]
    mixed, prompts = rows("sft_poetry_forms.jsonl.gz"), rows("poem_form_prompts.jsonl.gz")
    sft = [r for r in mixed if len(r["messages"]) == 2 and any(f.match(r["messages"][0]["content"]) for f in frames)]
    assert len(mixed) == len(rows("sft_poetry.jsonl.gz")) + len(sft)
    assert rows("sft_poem_forms.jsonl.gz") == sft
    with open(os.path.join(REPO, "tasks", "poem_form.jsonl"), encoding="utf-8") as f:
        held_out = [json.loads(line) for line in f]
    assert len(sft) == len(prompts) == 4000 and len(held_out) == 200
    for row in sft[:500]:
        answer = row["messages"][-1]["content"]
        asked = next(form for form, names in FORMS.items() if any(n in row["messages"][0]["content"] for n in names))
        assert poem_form([answer], [asked[0]], [asked[1]]) == [1.0] and poem_rhyme([answer], [asked[0]]) == [1.0]
    training_text = "".join(json.dumps(r, ensure_ascii=False) for r in mixed + prompts)
    for name in ("sft_poetry.jsonl.gz", "pretrain_poetry.jsonl.gz", "dpo_poetry.jsonl.gz"):
        training_text += "".join(json.dumps(r, ensure_ascii=False) for r in rows(name))
    assert not [item["title"] for item in held_out if f"《{item['title']}》" in training_text]
    assert not set(HELD_OUT_PHRASINGS) & set(TRAIN_PHRASINGS)
    for item in held_out:
        assert not any(p.split("{")[0] and item["request"].startswith(p.split("{")[0]) for p in TRAIN_PHRASINGS)
