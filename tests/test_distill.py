"""--mode distill: each divergence against TRL's generalized_jsd_loss on transformers' logits of teacher
and student, the teacher frozen and checked, exact resume (on-policy batches included), LoRA and DDP."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import (REPO, SUBPROCESS_ENV, TINY_MODEL_ARGS, logged_steps, run_and_resume, run_main, shipped_lines,
                      write_jsonl, write_tiny_model)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tokenizer):
    """A tiny model other than the student, its matrices scaled up so that its distributions are peaked."""
    def sharpen(model):
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 2:
                    param.mul_(4)
    return write_tiny_model(tmp_path_factory.mktemp("teacher") / "model", tokenizer, seed=5, edit=sharpen,
                            max_seq_len=64)


@pytest.fixture
def sft_data(tmp_path):
    return write_jsonl(tmp_path / "sft.jsonl", shipped_lines("sft_poetry.jsonl.gz", 400))


DISTILL = [*TINY_MODEL_ARGS, "--mode", "distill", "--batch_size", "4", "--log_interval", "1", "--eval_interval",
           "1000", "--eval_batches", "2", "--save_interval", "0", "--learning_rate", "1e-3", "--warmup_iters", "1",
           "--optimizer", "adamw", "--lr_schedule", "cosine"]


@pytest.mark.parametrize("beta,alpha,temperature", [(0.0, 1.0, 1.0), (1.0, 1.0, 2.0), (0.5, 1.0, 1.5),
                                                    (0.0, 0.3, 1.0)])
def test_the_loss_equals_trls_divergence_on_transformers_logits(beta, alpha, temperature, teacher, base_model,
                                                                 tokenizer, tmp_path):
    """SFT rows (labelled on the answers only, so the mask matters): our loss from model.py's logits equals
    TRL's generalized_jsd_loss (and, mixed in, the cross-entropy) from LlamaForCausalLM's."""
    from argparse import Namespace
    from transformers import LlamaForCausalLM
    from trl.experimental.gkd import GKDTrainer
    from dataset import SFTDataset, collate
    from distill import distillation_loss, predicting
    from model import Transformer
    data = write_jsonl(tmp_path / "sft.jsonl", shipped_lines("sft_poetry.jsonl.gz", 8))
    rows = [s for s, _ in zip(SFTDataset(data, tokenizer, 64), range(6))]
    batch = collate(rows, tokenizer.pad_token_id)
    labels, mask = batch["labels"], batch["labels"][:, 1:] != -100
    assert 0 < int(mask.sum()) < mask.numel()
    args = Namespace(distill_beta=beta, distill_alpha=alpha, distill_temperature=temperature)
    student, frozen = Transformer.from_pretrained(base_model), Transformer.from_pretrained(teacher)
    scored = predicting(labels)
    with torch.no_grad():
        ours, (summed, ce) = distillation_loss(student(batch["input_ids"], logits_at=scored).logits,
                                               frozen(batch["input_ids"], logits_at=scored).logits,
                                               labels[:, 1:][mask], int(mask.sum()), args)
        hf_student, hf_teacher = (LlamaForCausalLM.from_pretrained(p)(batch["input_ids"]).logits
                                  for p in (base_model, teacher))
    theirs = GKDTrainer.generalized_jsd_loss(hf_student[:, :-1], hf_teacher[:, :-1], labels=labels[:, 1:], beta=beta,
                                             temperature=temperature)
    hf_ce = torch.nn.functional.cross_entropy(hf_student[:, :-1][mask], labels[:, 1:][mask])
    assert float(summed) / int(mask.sum()) == pytest.approx(float(theirs), rel=1e-4)
    assert float(ours) == pytest.approx(alpha * float(theirs) + (1 - alpha) * float(hf_ce), rel=1e-4)


def test_the_teacher_stays_frozen_and_its_files_untouched(teacher, base_model, sft_data, tmp_path, monkeypatch):
    import distill
    from safetensors.torch import load_file
    teachers = []
    load = distill.load_teacher
    monkeypatch.setattr(distill, "load_teacher", lambda *a: teachers.append(load(*a)) or teachers[-1])
    before = load_file(os.path.join(teacher, "model.safetensors"))
    out = tmp_path / "out"
    assert run_main(["--data_path", sft_data, "--out_dir", out, "--init_from", base_model, "--teacher", teacher,
                     *DISTILL, "--max_steps", "3", "--learning_rate", "1e-2"]) is None
    (frozen,) = teachers
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    after = load_file(os.path.join(teacher, "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    from model import to_hf_name
    assert all(torch.equal(v, before[to_hf_name(k)]) for k, v in frozen.state_dict().items() if k != "output.weight")
    assert not os.path.exists(out / "teacher") and {"distill", "ce"} <= set(logged_steps(out)[3])
    student = load_file(os.path.join(out, "model.safetensors"))
    assert not all(torch.equal(student[k], load_file(os.path.join(base_model, "model.safetensors"))[k])
                   for k in student)  # the student trained


def test_a_teacher_with_another_tokenizer_is_refused(teacher, base_model, sft_data, tmp_path):
    from transformers import AutoTokenizer
    other = tmp_path / "other"
    shutil.copytree(teacher, other)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tokenizer.add_tokens(["<|new|>"])
    tokenizer.save_pretrained(str(other))
    error = run_main(["--data_path", sft_data, "--out_dir", tmp_path / "out", "--init_from", base_model,
                      "--teacher", other, *DISTILL, "--max_steps", "1"])
    assert isinstance(error, str) and "has another tokenizer than the student's" in error and "\n" not in error
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--distill_on_policy", "0.5", "--max_new_tokens", "12"],
                                   ["--lora_rank", "4", "--distill_beta", "0.5"]], ids=["on-policy", "lora-jsd"])
def test_resume_equals_the_uninterrupted_run(extra, teacher, base_model, sft_data, tmp_path):
    args = ["--data_path", sft_data, "--init_from", base_model, "--teacher", teacher, *DISTILL, "--max_steps", "6",
            "--save_interval", "3", *extra]
    a, b = run_and_resume(args, tmp_path, "checkpoint-3")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss", "distill", "ce", "tokens", "grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], abs=1e-6), (step, key)


def test_on_policy_batches_are_the_students_answers_to_the_data_prompts(teacher, base_model, sft_data, tmp_path):
    """With --distill_on_policy 1 every micro-batch is sampled: the labelled tokens are the student's own
    answers (at most --max_new_tokens each), not the data's."""
    out = tmp_path / "out"
    assert run_main(["--data_path", sft_data, "--out_dir", out, "--init_from", base_model, "--teacher", teacher,
                     *DISTILL, "--max_steps", "2", "--distill_on_policy", "1", "--max_new_tokens", "6"]) is None
    steps = logged_steps(out)
    assert steps[1]["tokens"] <= 4 * 6 and steps[2]["tokens"] - steps[1]["tokens"] <= 4 * 6


@pytest.mark.slow
def test_two_processes_distil(teacher, base_model, sft_data, tmp_path):
    out = tmp_path / "out"
    argv = ["--data_path", sft_data, "--out_dir", str(out), "--init_from", base_model, "--teacher", teacher, *DISTILL,
            "--max_steps", "2", "--batch_size", "2"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(REPO, "train_model.py"), *map(str, argv)], cwd=REPO, env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(logged_steps(out)) == [1, 2] and "2 process(es)" in done.stdout
