"""The race against TRL (python bench.py --trl [MODEL_DIR]): our SFT, DPO, LoRA SFT and distillation steps
against TRL's SFTTrainer (assistant_only_loss), DPOTrainer (sigmoid loss, beta 0.1, a frozen reference
copy), SFTTrainer with PEFT's LoraConfig on the same modules, and GKDTrainer (forward KL, off-policy:
lmbda 0, temperature 1, a student half the model's width and depth distilled from it), each pair on the
same weights and the same batch.

A step is forward, loss, backward and AdamW; TRL's is Trainer.training_step and the optimizer step, the
inside of Trainer.train without its data loading, logging and clipping, which our step does not time
either. Tokens/s count every token of the batch, padding included, the same for both sides. The SFT race
also times a bare HF step (hf_race's section 1 peer) on the same weights, which tells TRL's own cost from
the model's.

TRL is the oracle of correctness: before the race, both sides' first-step loss on the start weights must
agree (for DPO, whose first loss is ln 2 whatever the model, also the mean log-probabilities of the
chosen and rejected answers). The SFT batch is TRL's own tokenization of the conversations with our chat
template, checked to be ours token for token and mask for mask; the DPO batch is ours, handed to TRL's
collator, since TRL would also label the newline after <|im_end|>. LoRA: both sides get the same nonzero
adapters first, as PEFT starts B at zero, which would make the loss the base model's.
"""
import argparse
import copy
import itertools
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from benchmarks.common import (best, format_row, machine, plural, race, repo_path, row, speedup,
                               table_header)
from benchmarks.hf_race import (CONFIGS, SIZES, autocast_for, loss_tolerance, model_config, ours_and_hf,
                                train_step_fn)
from corpus import parse_conversation, parse_preference, read_records
from dataset import PreferenceDataset, collate, collate_preferences, encode_conversation
from lora import (LORA_TARGETS, adapter_hf_name, add_lora, is_lora_weight, lora_hf_names,
                  lora_target_names)
from model import Transformer
from distill import distillation_loss, predicting
from modes import dpo_loss, sequence_log_probs

STEP_GOAL = 2.0  # minimum ratio of our step's tokens/s to TRL's, for each of SFT, DPO, LoRA SFT, distillation
# The README's LoRA run: rank 16, alpha 32, on train_model.py's default targets (attention and MLP).
TRL_LORA = argparse.Namespace(lora_rank=16, lora_alpha=32.0, lora_dropout=0.0, lora_targets=",".join(LORA_TARGETS))
TRL_DATA = {"sft": "data/sft_poetry.jsonl.gz", "dpo": "data/dpo_poetry.jsonl.gz"}  # shipped, beside bench.py


@dataclass
class StepRace:
    """Our step against TRL's, on the same weights and batch."""
    ours: Callable  # one training step
    trl: Callable
    tokens: int  # per step: every token of the batch, padding included
    same_batch: bool | None  # TRL's own tokenization gave our batch; None: ours went to TRL's collator
    first_ours: Callable  # the figures both must agree on at the start: the loss first (DPO: and log-probs)
    first_trl: Callable
    bare_hf: Callable | None = None  # a bare HF step on the same weights: what TRL adds to it


# --- the contenders --------------------------------------------------------------------------------

def trl_models(args, tokenizer, device):
    """Our Transformer and LlamaForCausalLM with the same weights: --trl's model, or a random one of
    --config's shape."""
    from transformers import AutoModelForCausalLM
    if not args.trl:
        return ours_and_hf(model_config(args.config, len(tokenizer), 1024), device, args.seed)
    ours = Transformer.from_pretrained(args.trl, strict=True)
    hf = AutoModelForCausalLM.from_pretrained(args.trl, dtype=torch.float32, attn_implementation="sdpa")
    return ours.to(device), hf.to(device)


def shipped_examples(n):
    """The first n conversations and the first n preference pairs of the shipped data."""
    conversations = [m for _, m in itertools.islice(read_records(repo_path(TRL_DATA["sft"]), parse_conversation), n)]
    pairs = [p for _, p in itertools.islice(read_records(repo_path(TRL_DATA["dpo"]), parse_preference), n)]
    return conversations, pairs


def our_batches(tokenizer, conversations, pairs, seq):
    """Our SFT batch of the conversations and our preference batch of the pairs, as training makes them."""
    sft = collate([encode_conversation(tokenizer, m, seq) for m in conversations], tokenizer.pad_token_id)
    preference_data = PreferenceDataset(repo_path(TRL_DATA["dpo"]), tokenizer, seq)
    dpo = collate_preferences([preference_data._encode(p) for p in pairs], tokenizer.pad_token_id)
    return sft, dpo


def trl_config(config_class, out_dir, batch_size, device, seed, **kwargs):
    """TRL's arguments for one step as section 1's: AdamW at 3e-4 with betas (0.9, 0.95) and weight decay
    0.1, bf16 on GPU, float32 on CPU; nothing logged, saved or evaluated."""
    return config_class(output_dir=out_dir, per_device_train_batch_size=batch_size, learning_rate=3e-4,
                        adam_beta2=0.95, weight_decay=0.1, bf16=device.type == "cuda",
                        use_cpu=device.type == "cpu", report_to="none", save_strategy="no",
                        logging_strategy="no", eval_strategy="no", dataloader_num_workers=0, seed=seed,
                        disable_tqdm=True, **kwargs)


def half_size_student(ours, seed):
    """A random student of half the model's width and depth (heads halved too), as train.sh distill makes
    one, and the same student in transformers."""
    from dataclasses import replace
    c = ours.config
    config = replace(c, dim=c.dim // 2, n_layers=max(1, c.n_layers // 2), n_heads=max(1, c.n_heads // 2),
                     n_kv_heads=max(1, c.n_kv_heads // 2), hidden_dim=0)
    return ours_and_hf(config, next(ours.parameters()).device, seed)


def trl_trainers(hf, tokenizer, conversations, pairs, seq, out_dir, device, seed, student_hf):
    """TRL's SFTTrainer, SFTTrainer + PEFT with TRL_LORA's adapters, DPOTrainer, each on its own copy of hf's
    weights, and GKDTrainer distilling hf into student_hf."""
    import peft
    import trl
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    batch_size = len(conversations)

    def sft_trainer(**kwargs):
        return trl.SFTTrainer(model=copy.deepcopy(hf), processing_class=tokenizer,
                              train_dataset=Dataset.from_list([{"messages": m} for m in conversations]),
                              args=trl_config(trl.SFTConfig, out_dir, batch_size, device, seed, max_length=seq,
                                              assistant_only_loss=True), **kwargs)
    hf_targets = [lora_hf_names()[t] for t in lora_target_names(TRL_LORA.lora_targets)]  # q_proj, ...
    lora = peft.LoraConfig(r=TRL_LORA.lora_rank, lora_alpha=TRL_LORA.lora_alpha, lora_dropout=TRL_LORA.lora_dropout,
                           target_modules=hf_targets, task_type="CAUSAL_LM")
    return {
        "sft": sft_trainer(),
        "lora": sft_trainer(peft_config=lora),
        "dpo": trl.DPOTrainer(
            model=copy.deepcopy(hf), ref_model=copy.deepcopy(hf).eval(), processing_class=tokenizer,
            train_dataset=Dataset.from_list([dict(zip(("prompt", "chosen", "rejected"), p)) for p in pairs]),
            args=trl_config(trl.DPOConfig, out_dir, batch_size, device, seed, beta=0.1, loss_type=["sigmoid"],
                            max_length=seq)),
        "distill": GKDTrainer(
            model=copy.deepcopy(student_hf), teacher_model=copy.deepcopy(hf).eval(), processing_class=tokenizer,
            train_dataset=Dataset.from_list([{"messages": m} for m in conversations]),
            args=trl_config(GKDConfig, out_dir, batch_size, device, seed, lmbda=0.0, beta=0.0, temperature=1.0,
                            max_length=seq)),
    }


def trainer_step_fn(trainer, inputs):
    """One step of a TRL trainer as Trainer.train runs it (compute_loss, backward, optimizer step),
    without its data loading, logging and gradient clipping, which our step does not time either."""
    trainer.create_optimizer_and_scheduler(num_training_steps=1_000_000)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets before its steps
    model = trainer.model
    model.train()

    def step():
        trainer.training_step(model, inputs)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad(set_to_none=True)
    return step


def sft_inputs(trainer, sft):
    """TRL's own batch (its tokenization and masking of our conversations), and whether it is our batch sft."""
    inputs = trainer._prepare_inputs(trainer.data_collator(list(trainer.train_dataset)))
    same = torch.equal(inputs["input_ids"].cpu(), sft["input_ids"]) and \
        torch.equal(inputs["labels"].cpu(), sft["labels"])
    return inputs, same


def dpo_trl_inputs(trainer, labels, input_ids):
    """Our preference batch (chosen rows, then rejected) in TRL's form: prompt_ids, and each answer as the
    tokens from the first labelled one to the last (the template's newline after <|im_end|> is ours but
    unlabelled; TRL would label it, so it is left out: it cannot change the log-probabilities before it)."""
    chosen, rejected = labels.chunk(2)
    examples = []
    for i, (c, r) in enumerate(zip(chosen, rejected)):
        c_pos, r_pos = (c != -100).nonzero().flatten(), (r != -100).nonzero().flatten()
        start = int(c_pos[0])
        ids_c, ids_r = input_ids[i], input_ids[len(chosen) + i]
        assert int(r_pos[0]) == start and torch.equal(ids_c[:start], ids_r[:start])
        examples.append({"prompt_ids": ids_c[:start].tolist(),
                         "chosen_ids": ids_c[start:int(c_pos[-1]) + 1].tolist(),
                         "rejected_ids": ids_r[start:int(r_pos[-1]) + 1].tolist()})
    return trainer._prepare_inputs(trainer.data_collator(examples))


def our_dpo_loss(model, input_ids, labels, reference, beta=0.1):
    """train_model.py --mode dpo's loss of a preference batch against a frozen reference model."""
    with torch.no_grad():
        reference_log_probs = sequence_log_probs(reference(input_ids).logits, labels)
    return dpo_loss(model(input_ids).logits, reference_log_probs, labels, beta, labels.shape[0] // 2)[0]


def give_same_adapters(ours_lora, trl_model):
    """The same nonzero adapters on both sides, as after some training: PEFT starts B at zero, which would
    make the first LoRA loss the base model's whatever the adapters; with these the loss checks the
    targets and the scale."""
    import peft
    with torch.no_grad():
        for name, p in ours_lora.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.02)
    peft.set_peft_model_state_dict(trl_model, {adapter_hf_name(k): v for k, v in ours_lora.state_dict().items()
                                               if is_lora_weight(k)})


def our_distillation_loss(student, input_ids, labels, teacher):
    """train_model.py --mode distill's loss of a batch: forward KL to the teacher at temperature 1."""
    scored, targets = predicting(labels), labels[:, 1:][labels[:, 1:] != -100]
    with torch.no_grad():
        teacher_logits = teacher(input_ids, logits_at=scored).logits
    args = argparse.Namespace(distill_alpha=1.0, distill_beta=0.0, distill_temperature=1.0)
    return distillation_loss(student(input_ids, logits_at=scored).logits, teacher_logits, targets, len(targets),
                             args)[0]


def step_races(ours, ours_lora, hf, trainers, sft, dpo, device, student):
    """The four races, by name. Each contender trains its own copy of the weights."""
    ids, labels = sft["input_ids"].to(device), sft["labels"].to(device)
    pref_ids, pref_labels = dpo["input_ids"].to(device), dpo["labels"].to(device)
    trl_sft, trl_lora, trl_dpo, trl_distill = trainers["sft"], trainers["lora"], trainers["dpo"], trainers["distill"]
    sft_batch, sft_same = sft_inputs(trl_sft, sft)
    lora_batch, lora_same = sft_inputs(trl_lora, sft)
    dpo_batch = dpo_trl_inputs(trl_dpo, dpo["labels"], dpo["input_ids"])
    reference = copy.deepcopy(ours).eval().requires_grad_(False)
    give_same_adapters(ours_lora, trl_lora.model)
    # Our batch, right-padded, with its attention mask: the positions that carry loss are the same for both.
    distill_batch = trl_distill._prepare_inputs({"input_ids": ids, "labels": labels,
                                                 "attention_mask": (ids != trl_distill.processing_class.pad_token_id
                                                                    ).long()})

    def dpo_figures(loss, logits):
        """The loss, then the mean log-probabilities of the chosen and the rejected answers."""
        chosen, rejected = sequence_log_probs(logits, pref_labels).chunk(2)
        return float(loss), float(chosen.mean()), float(rejected.mean())

    def trl_dpo_figures():
        loss, logged = trl_dpo.compute_loss(trl_dpo.model, dpo_batch), trl_dpo._metrics["train"]
        return float(loss), logged["logps/chosen"][-1], logged["logps/rejected"][-1]
    # StepRace(our step, TRL's, tokens per step, same batch, first figures of ours, of TRL's)
    return {
        "SFT (SFTTrainer)": StepRace(
            train_step_fn(copy.deepcopy(ours), ids, labels, device), trainer_step_fn(trl_sft, sft_batch),
            ids.numel(), sft_same, lambda: (float(ours(ids, labels=labels).loss),),
            lambda: (float(trl_sft.compute_loss(trl_sft.model, sft_batch)),),
            bare_hf=train_step_fn(copy.deepcopy(hf).train(), ids, labels, device)),
        "DPO (DPOTrainer)": StepRace(
            train_step_fn(copy.deepcopy(ours), pref_ids, pref_labels, device,
                          loss_fn=partial(our_dpo_loss, reference=reference)),
            trainer_step_fn(trl_dpo, dpo_batch), pref_ids.numel(), None,
            lambda: dpo_figures(our_dpo_loss(ours, pref_ids, pref_labels, reference), ours(pref_ids).logits),
            trl_dpo_figures),
        "LoRA SFT (SFTTrainer+PEFT)": StepRace(
            train_step_fn(ours_lora, ids, labels, device), trainer_step_fn(trl_lora, lora_batch),
            ids.numel(), lora_same, lambda: (float(ours_lora(ids, labels=labels).loss),),
            lambda: (float(trl_lora.compute_loss(trl_lora.model, lora_batch)),)),
        "Distillation (GKDTrainer)": StepRace(
            train_step_fn(copy.deepcopy(student), ids, labels, device,
                          loss_fn=partial(our_distillation_loss, teacher=reference)),
            trainer_step_fn(trl_distill, distill_batch), ids.numel(), None,
            lambda: (float(our_distillation_loss(student, ids, labels, reference)),),
            lambda: (float(trl_distill.compute_loss(trl_distill.model, distill_batch)),)),
    }


# --- the race --------------------------------------------------------------------------------------

def run_step_race(step_race, sizes, device):
    """The first figures of both sides on the start weights, then the steps in alternating rounds."""
    with torch.no_grad(), autocast_for(device):  # the weights both start the race with
        first = {"ours": step_race.first_ours(), "trl": step_race.first_trl()}
    contenders = {"ours": step_race.ours, "trl": step_race.trl}
    if step_race.bare_hf is not None:
        contenders["hf"] = step_race.bare_hf
    seconds, _ = race(contenders, device, sizes["train_rounds"], sizes["train_budget_s"])
    tolerance = loss_tolerance(device)
    return {
        "tokens_per_s": {k: step_race.tokens / best(v) for k, v in seconds.items()},
        "ratio": speedup(seconds["ours"], seconds["trl"]), "rounds": len(seconds["ours"]),
        "first": first, "difference": max(abs(a - b) for a, b in zip(first["ours"], first["trl"])),
        "same_loss": all(math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance)
                         for a, b in zip(first["ours"], first["trl"])), "same_batch": step_race.same_batch,
    }


def bench_trl(args, device):
    """Our SFT, DPO and LoRA SFT steps against TRL's SFTTrainer, DPOTrainer and SFTTrainer + PEFT on the same
    weights and batch: tokens/s and the first step's loss of each."""
    import peft
    import trl
    from datasets import disable_progress_bars
    from transformers import AutoTokenizer
    disable_progress_bars()
    if args.trl and not os.path.isfile(os.path.join(args.trl, "model.safetensors")):
        sys.exit(f"error: --trl {args.trl}: holds no model.safetensors; pass a directory written by train_model.py")
    sizes = SIZES["quick" if args.quick else "full"]
    n, seq = sizes["batch_size"], sizes["train_seq_len"] or CONFIGS[args.config]["train_seq_len"]
    tokenizer = AutoTokenizer.from_pretrained(args.trl if args.trl and os.path.isfile(
        os.path.join(args.trl, "tokenizer.json")) else args.tokenizer_path)
    conversations, pairs = shipped_examples(n)
    sft, dpo = our_batches(tokenizer, conversations, pairs, seq)
    ours, hf = trl_models(args, tokenizer, device)
    results = {"machine": machine(device), "trl": trl.__version__, "peft": peft.__version__,
               "model": args.trl or f"random, --config {args.config}", "params": ours.num_params(),
               "batch_size": n, "seq_len": seq, "tolerance": loss_tolerance(device), "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        ours_lora = add_lora(copy.deepcopy(ours), TRL_LORA)
        student, student_hf = half_size_student(ours, args.seed)
        trainers = trl_trainers(hf, tokenizer, conversations, pairs, seq, tmp, device, args.seed, student_hf)
        for name, step_race in step_races(ours, ours_lora, hf, trainers, sft, dpo, device, student).items():
            results["rows"][name] = run_step_race(step_race, sizes, device)
    return results


# --- report ----------------------------------------------------------------------------------------

def trl_rows(t):
    out = [row("TRL race", name, "tok/s", r["tokens_per_s"]["ours"], r["tokens_per_s"]["trl"], r["ratio"],
               STEP_GOAL) for name, r in t["rows"].items()]
    tps = t["rows"]["SFT (SFTTrainer)"]["tokens_per_s"]
    return out + [row("TRL race", "SFT: ours vs bare HF", "tok/s", tps["ours"], tps["hf"], tps["ours"] / tps["hf"]),
                  row("TRL race", "SFT: bare HF vs SFTTrainer", "tok/s", tps["hf"], tps["trl"],
                      tps["hf"] / tps["trl"])]


def trl_header(t):
    mach = t["machine"]
    return [f"Tiny-LLM vs TRL {t['trl']} (peft {t['peft']}): {mach['cpu']}, {mach['cores']} cores "
            f"({plural(mach['torch_threads'], 'torch thread')}), torch {mach['torch']}, device {mach['device']}; "
            f"model {t['model']}, {t['params'] / 1e6:.2f}M parameters", table_header()]


def trl_notes(t):
    return [f"{name}: first step, ours vs TRL: loss {r['first']['ours'][0]:.6f} vs {r['first']['trl'][0]:.6f}"
            + (f", mean log p(chosen) {r['first']['ours'][1]:.4f} vs {r['first']['trl'][1]:.4f}, (rejected) "
               f"{r['first']['ours'][2]:.4f} vs {r['first']['trl'][2]:.4f}" if len(r["first"]["ours"]) > 1 else "")
            + f": same {r['same_loss']} (largest difference {r['difference']:.1e}; tolerance {t['tolerance']:g}, "
            "relative or absolute); "
            + ("our batch given to TRL's collator" if r["same_batch"] is None
               else f"TRL's own tokenization gave our batch: {r['same_batch']}")
            + f"; {plural(r['rounds'], 'round')}" for name, r in t["rows"].items()] + [
            f"batch {t['batch_size']} (DPO: {t['batch_size']} pairs) of at most {t['seq_len']} tokens from "
            f"{TRL_DATA['sft']} and {TRL_DATA['dpo']}; LoRA rank {TRL_LORA.lora_rank}, alpha {TRL_LORA.lora_alpha:g} "
            f"on {TRL_LORA.lora_targets}; a step: loss, backward, AdamW (TRL: Trainer.training_step + optimizer step)"]


def run(args, device):
    """The four races; prints the table (or the JSON) and returns the results."""
    results = bench_trl(args, device)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n".join(trl_header(results) + [format_row(r) for r in trl_rows(results)] + trl_notes(results)))
    return results
