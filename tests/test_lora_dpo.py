"""LoRA (PEFT) and DPO in train_model.py, against oracles written elsewhere: PEFT's own loading of the
adapter onto transformers' LlamaForCausalLM, and the DPO paper's loss computed from LlamaForCausalLM's
log-probabilities. Exact resume of LoRA and DPO runs is in test_long_runs.py (RESUME_CASES)."""
import json
import os
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_MODEL_ARGS, preference_pairs, read_metrics, run_main, shipped_lines, write_jsonl

FAST = [*TINY_MODEL_ARGS, "--batch_size", "4", "--log_interval", "1", "--eval_interval", "1000",
        "--eval_batches", "2", "--learning_rate", "1e-2", "--warmup_iters", "1"]
LORA = ["--lora_rank", "4", "--lora_alpha", "8"]


def hf_model(path):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(str(path), local_files_only=True).eval()


def logits_of(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


INPUT_IDS = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110, 120, 130]])


# --- LoRA ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_model):
    tmp = tmp_path_factory.mktemp("lora")
    data = write_jsonl(tmp / "sft.jsonl", [{"messages": [p["prompt"][-1], *p["chosen"]]}
                                           for p in preference_pairs(200)[::2]])
    out = tmp / "out"
    assert run_main(["--data_path", data, "--out_dir", out, *FAST, "--init_from", base_model, *LORA,
                     "--max_steps", "3", "--save_interval", "3"]) is None
    return out


def test_lora_merged_model_equals_the_peft_loaded_base_plus_adapter(lora_run, base_model):
    from peft import PeftModel
    merged = hf_model(lora_run)  # an ordinary checkpoint: what generate.py, eval.py and transformers load
    for adapter in (lora_run / "adapter", lora_run / "checkpoint-3"):
        with open(adapter / "adapter_config.json") as f:
            assert json.load(f)["base_model_name_or_path"] == os.path.abspath(base_model)
        peft_model = PeftModel.from_pretrained(hf_model(base_model), str(adapter)).eval()
        torch.testing.assert_close(logits_of(peft_model, INPUT_IDS), logits_of(merged, INPUT_IDS),
                                   atol=1e-4, rtol=1e-4)
    # The adapter did learn something: the merged model is not the base.
    assert not torch.allclose(logits_of(merged, INPUT_IDS), logits_of(hf_model(base_model), INPUT_IDS), atol=1e-3)


def test_lora_trains_only_the_adapters_and_checkpoints_hold_only_them(lora_run, base_model):
    from peft import PeftModel
    peft_model = PeftModel.from_pretrained(hf_model(base_model), str(lora_run / "adapter"), is_trainable=True)
    trainable, total = peft_model.get_nb_trainable_parameters()
    records = [r for r in read_metrics(lora_run) if "loss" in r]
    assert records and all(r["trainable_params"] == trainable for r in records)
    assert trainable < 0.05 * total
    checkpoint = lora_run / "checkpoint-3"
    assert not (checkpoint / "model.safetensors").exists()
    state = torch.load(checkpoint / "training_state.pt", weights_only=False)
    moments = state["optimizer"]["state"]
    assert moments and all(".lora_A." in name or ".lora_B." in name for name in moments)
    assert sum(m["exp_avg"].numel() for m in moments.values()) == trainable


def test_lora_rank_0_is_ordinary_training(tmp_path, sft_file, base_model):
    out = tmp_path / "out"
    assert run_main(["--data_path", sft_file, "--out_dir", out, *FAST, "--init_from", base_model,
                     "--lora_rank", "0", "--max_steps", "1"]) is None
    total = sum(p.numel() for p in hf_model(out).parameters())  # lm_head is tied: counted once
    assert [r["trainable_params"] for r in read_metrics(out) if "loss" in r] == [total]
    assert not (out / "adapter").exists()


@pytest.mark.parametrize("extra, message", [
    (["--lora_rank", "4"], "--lora_rank needs --init_from"),
    (["--lora_rank", "4", "--init_from", "BASE", "--lora_targets", "wq,qkv"], "unknown module(s) ['qkv']"),
    (["--lora_rank", "4", "--init_from", "BASE", "--fsdp"], "does not work with --fsdp"),
    (["--mode", "dpo"], "--mode dpo needs --init_from"),
])
def test_bad_lora_and_dpo_arguments_stop_with_one_line(extra, message, tmp_path, sft_file, base_model):
    extra = [base_model if a == "BASE" else a for a in extra]
    error = run_main(["--data_path", sft_file, "--out_dir", tmp_path / "out", *FAST, *extra])
    assert isinstance(error, str) and error.startswith("error: ") and message in error and "\n" not in error


# --- DPO -------------------------------------------------------------------------------------------

def perturbed_copy(base_model, path, seed=1):
    """base_model's weights plus noise: a policy that differs from its reference."""
    from model import Transformer
    model = Transformer.from_pretrained(base_model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(str(path))
    return str(path)


def paper_log_prob(model, tokenizer, prompt, answer):
    """log p(answer's assistant tokens | prompt) from a LlamaForCausalLM, one sequence, no padding."""
    prompt_length = len(tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True)["input_ids"])
    encoded = tokenizer.apply_chat_template(prompt + answer, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    ids = torch.tensor([encoded["input_ids"]])
    scored = [t for t in range(prompt_length, ids.shape[1]) if encoded["assistant_masks"][t]]
    log_probs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return sum(log_probs[t - 1, ids[0, t]] for t in scored)


def test_dpo_loss_and_gradient_equal_the_papers_formula(tmp_path, tokenizer, base_model):
    from corpus import parse_preference
    from dataset import PreferenceDataset, collate_preferences
    from model import Transformer, to_hf_name
    from modes import dpo_loss, sequence_log_probs
    records = [
        {"prompt": "《静夜思》的作者是谁？", "chosen": "《静夜思》的作者是李白。", "rejected": "《静夜思》的作者是白居易。"},
        {"prompt": [{"role": "system", "content": "你是一个熟读古诗词的AI助手。"},
                    {"role": "user", "content": "请背诵李白的《静夜思》。"}],
         "chosen": [{"role": "assistant", "content": "床前明月光，疑是地上霜。"}],
         "rejected": [{"role": "assistant", "content": "白日依山尽，黄河入海流。"}]},
        {"prompt": [{"role": "user", "content": "谁写了《静夜思》？"},
                    {"role": "assistant", "content": "李白。"},  # not scored: part of the prompt
                    {"role": "user", "content": "再说一遍。"}],
         "chosen": [{"role": "assistant", "content": "李白。"}],
         "rejected": [{"role": "assistant", "content": "杜甫。"}]},
    ]
    pairs = [parse_preference(r) for r in records]
    dataset = PreferenceDataset(write_jsonl(tmp_path / "pairs.jsonl", records), tokenizer, 64)
    batch = collate_preferences([dataset._encode(p) for p in pairs], tokenizer.pad_token_id)
    assert batch["input_ids"].shape[1] < 64  # nothing truncated: the formula below sees whole sequences
    policy_dir = perturbed_copy(base_model, tmp_path / "policy")
    beta = 0.1

    policy = Transformer.from_pretrained(policy_dir)
    reference = Transformer.from_pretrained(base_model).eval()
    with torch.no_grad():
        reference_log_probs = sequence_log_probs(reference(batch["input_ids"]).logits, batch["labels"])
    loss, (margin_sum, correct) = dpo_loss(policy(batch["input_ids"]).logits, reference_log_probs, batch["labels"],
                                           beta, len(pairs))
    loss.backward()

    # The paper's formula, pair by pair (no padding), from transformers' model.
    hf_policy, hf_reference = hf_model(policy_dir), hf_model(base_model)
    margins = []
    for prompt, chosen, rejected in pairs:
        with torch.no_grad():
            ref_chosen = paper_log_prob(hf_reference, tokenizer, prompt, chosen)
            ref_rejected = paper_log_prob(hf_reference, tokenizer, prompt, rejected)
        margins.append(beta * ((paper_log_prob(hf_policy, tokenizer, prompt, chosen) - ref_chosen)
                               - (paper_log_prob(hf_policy, tokenizer, prompt, rejected) - ref_rejected)))
    margins = torch.stack(margins)
    expected = -F.logsigmoid(margins).mean()
    expected.backward()
    assert float(loss) == pytest.approx(float(expected), abs=1e-5)
    assert float(margin_sum) == pytest.approx(float(margins.sum()), abs=1e-5)
    assert int(correct) == int((margins > 0).sum())
    hf_grads = {name: p.grad for name, p in hf_policy.named_parameters()}
    for name, p in policy.named_parameters():
        if name == "output.weight":
            continue  # tied to tok_embeddings, whose gradient holds both
        torch.testing.assert_close(p.grad, hf_grads[to_hf_name(name)], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_reference_is_the_init_from_model_throughout(lora, tmp_path, dpo_file, base_model, monkeypatch):
    import modes
    import train_model
    objectives = []

    class RecordedDPO(modes.DPO):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            objectives.append(self)
    monkeypatch.setitem(train_model.MODES, "dpo", RecordedDPO)
    start = perturbed_copy(base_model, tmp_path / "start")
    out = tmp_path / "out"
    assert run_main(["--data_path", dpo_file, "--out_dir", out, *FAST, "--init_from", start, "--max_steps", "3",
                     *(LORA if lora else [])]) is None
    trained = logits_of(hf_model(out), INPUT_IDS)
    with torch.no_grad():
        reference = objectives[0].reference(INPUT_IDS)
    torch.testing.assert_close(reference, logits_of(hf_model(start), INPUT_IDS), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(trained, reference, atol=1e-3), "the policy did not train"
    records = read_metrics(out)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(0 <= r["reward_accuracy"] <= 1 and "reward_margin" in r for r in steps)
    # The first step's policy is the reference: every reward is 0, so the loss is log 2.
    assert steps[0]["loss"] == pytest.approx(0.693147, abs=1e-5) and steps[0]["reward_margin"] == 0
    evaluations = [r for r in records if "val_preference_accuracy" in r]
    assert [r["step"] for r in evaluations] == [0, 3]  # before training, and at the end


def test_bad_preference_lines_name_file_and_line(tmp_path, base_model, capsys):
    good = preference_pairs(300)
    bad = {3: "not json", 5: json.dumps({"prompt": "q", "chosen": "a"}),
           7: json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}),
           9: json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}],
                          "rejected": "b"})}
    lines = [bad.get(i + 1, record) for i, record in enumerate(good)]
    data = write_jsonl(tmp_path / "dpo_bad.jsonl", lines)
    argv = ["--data_path", data, "--out_dir", tmp_path / "out", *FAST, "--init_from", base_model, "--max_steps", "1"]
    error = run_main([*argv, "--strict"])
    assert error == f"error: {data}:3: invalid JSON (Expecting value) (--strict stops at the first bad line)"
    assert run_main([*argv, "--max_bad_fraction", "0.05"]) is None
    warning = capsys.readouterr().err
    assert f"{data}:5: no field 'rejected'" in warning
    assert f"{data}:7: 'chosen' and 'rejected' are the same" in warning


def test_shipped_held_out_pairs_share_no_answer_and_no_title_with_the_training_pairs():
    # A held-out chosen answer that is a training pair's rejected one (or the reverse) would be pushed the
    # wrong way by DPO on the training pairs, and a shared title would test recall of a trained pair.
    def answers(pairs):
        return {turn["content"] for pair in pairs for side in ("chosen", "rejected") for turn in pair[side]}

    def titles(pairs):
        return {re.search(r"《(.+)》", pair["prompt"][-1]["content"]).group(1) for pair in pairs}

    train, held_out = shipped_lines("dpo_poetry.jsonl.gz", None), shipped_lines("dpo_poetry_eval.jsonl.gz", None)
    assert len(train) > 3000 and len(held_out) >= 300
    assert not answers(train) & answers(held_out)
    assert not titles(train) & titles(held_out)
