"""Benchmark Tiny-LLM against its peers, side by side in one run.

    python bench.py                              the demo model on CPU (2 to 3.5 minutes)
    python bench.py --no-compile                 without torch.compile (training step, decoding step)
    python bench.py --device cuda --config 215m  the 215M recipe's model on a GPU (bf16 autocast)
    python bench.py --quick --json               small sizes, JSON instead of the table (smoke tests)
    python bench.py --trl runs/demo/sft          our SFT, DPO and LoRA SFT steps against TRL's trainers

Five sections, each a figure of ours against a peer's, with a goal:
  1. train step tokens/s: model.Transformer against transformers' LlamaForCausalLM loaded from our own
     checkpoint (same architecture, same weights): forward with labels, backward, AdamW step; and our
     step with --optimizer muon against ours with AdamW (Muon's extra cost).
  2. useful tokens/s (positions that carry loss): our packed PretrainDataset against padding every
     document to max_seq_len, the same model and batch size.
  3. greedy generation tokens/s: our KV-cache generate (eager, and with its decoding step compiled)
     against HF generate and against recomputing the whole context at every step; all must produce
     the same tokens.
  4. data preparation: JSONL to token ids through PretrainDataset, against the training tokens/s; the
     token cache built by 1 and 2 worker processes, and the loader reading it, against the 300k tokens/s
     the 215M recipe trains at on one H200 (how many cores keep such a GPU fed).
  5. MFU of the training step against the measured matmul peak of the device.
Sections 1 and 3 also time the model's weight matmuls alone, in the order the step runs them, and print
the ceiling they set: how much faster than HF any implementation could be if everything but those
matmuls took no time at all.

The machine may be shared (on CPU a background job can take most of it), so nothing is timed alone:
contenders run in alternating rounds, one call each per round, and each figure is a contender's
fastest round. Load only ever adds time, so the fastest round is the least disturbed one, and the
alternation gives every contender the same chances at the quiet moments. On CPU the bench runs one
torch thread and times with the CPU time of its process (see main and clock_for): with two threads
on two busy cores the same train step took anything from 0.5 to 14 s, and medians swung from 0.6x
to 1.5x between runs of the same code. Ratios are what the goals judge; absolute CPU figures are
those of one core (--threads 2 on an idle machine for both cores).
"""
import argparse
import contextlib
import copy
import itertools
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from corpus import open_binary, parse_text, read_records
from dataset import PretrainDataset, collate, collate_preferences
from token_cache import build_token_cache, cache_dtype
from model import ModelConfig, Transformer
from logger import measure_matmul_flops, synchronize
from lora import LORA_TARGETS
from recipes import choose_recipe, make_optimizers
from train_model import parse_args as parse_train_args

# Model shapes. demo: train.sh's CPU demo; 215m: the seed's GPU recipe; tiny: tests and smoke runs.
CONFIGS = {
    "demo": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, train_seq_len=256),
    "215m": dict(dim=1024, n_layers=18, n_heads=16, n_kv_heads=8, train_seq_len=512),
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, train_seq_len=256),
}
# Run sizes. Section 1 trains at train_seq_len (None: the config's). pack_len: section 2's max_seq_len
# (the 215M recipe's 512), also the model length of section 3, which must hold prompt + new_tokens.
# *_rounds and *_budget_s: see race(); a CPU run takes about 3 minutes, more on a loaded machine.
SIZES = {
    "full": dict(batch_size=8, train_seq_len=None, pack_len=512, prompt_len=16, new_tokens=256,
                 train_rounds=(3, 15), train_budget_s=40, pack_rounds=(2, 6), pack_budget_s=20,
                 gen_rounds=(1, 5), gen_budget_s=45, cache_rounds=2),
    "quick": dict(batch_size=2, train_seq_len=64, pack_len=128, prompt_len=8, new_tokens=32,
                  train_rounds=(1, 2), train_budget_s=2, pack_rounds=(1, 1), pack_budget_s=1,
                  gen_rounds=(1, 1), gen_budget_s=1, cache_rounds=1),
}
GOALS = {  # minimum ratio of ours to the peer's
    "train_eager": 1.0, "train_compiled": 1.2, "muon_vs_adamw": 1 / 1.15, "useful_tokens": 4.0, "gen_vs_hf": 2.0,
    "gen_vs_recompute": 5.0, "data_vs_train": 20.0, "cache_2_workers": 1.7, "loader_vs_h200": 1.0,
    "trl_step": 2.0,  # --trl: each of SFT, DPO and LoRA SFT
}
H200_TOKENS_PER_S = 300_000  # the 215M recipe on one H200 at about 40% MFU: what the data path must feed


# --- timing ----------------------------------------------------------------------------------------

def clock_for(device):
    """The clock of a timed call. On one CPU thread, the CPU time of this process: it counts what the
    work costs and not the time the core was lent to other processes, so a loaded machine no longer
    swings the figures (and on an idle machine it equals wall time). Otherwise wall time."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.process_time
    return time.perf_counter


def race(contenders, device, rounds, budget_s, warmup=1):
    """Seconds per call of each contender, round by round, and what each returned on its first call.

    Every round calls each contender once, the order reversed every other round so that neither
    always follows the other (caches, turbo clocks). `warmup` untimed calls come first. rounds is
    (min, max): past min, no round starts that would end after budget_s seconds, so a loaded machine
    gives fewer samples instead of a run of unbounded length.
    """
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    seconds = {name: [] for name in contenders}
    first = {}
    names, (min_rounds, max_rounds) = list(contenders), rounds
    clock, start = clock_for(device), time.perf_counter()
    for r in range(max_rounds):
        elapsed = time.perf_counter() - start
        if r >= min_rounds and elapsed * (r + 1) / r > budget_s:
            break
        for name in (names if r % 2 == 0 else names[::-1]):
            synchronize(device)
            call_start = clock()
            out = contenders[name]()
            synchronize(device)
            seconds[name].append(clock() - call_start)
            first.setdefault(name, out)
    return seconds, first


def best(seconds):
    """The fastest call: load from other processes only ever adds time, so the fastest of several
    alternating rounds is each contender's least disturbed run (as timeit takes the minimum)."""
    return min(seconds)


def speedup(ours_seconds, peer_seconds):
    """How many times faster ours is than the peer, best round against best round."""
    return best(peer_seconds) / best(ours_seconds)


# --- models ----------------------------------------------------------------------------------------

def model_config(name, vocab_size, max_seq_len):
    shape = {k: v for k, v in CONFIGS[name].items() if k != "train_seq_len"}
    return ModelConfig(vocab_size=vocab_size, max_seq_len=max_seq_len, **shape)


def ours_and_hf(config, device, seed, init=None):
    """Our Transformer and transformers' LlamaForCausalLM with identical weights.

    HF's model comes from our own checkpoint (save_pretrained, then AutoModelForCausalLM), the way a
    user of the peers' stack would load it. `init(model)` may change our weights first.
    """
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    ours = Transformer(config)
    if init is not None:
        init(ours)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa")
    return ours.to(device), hf.to(device)


def autocast_for(device):
    """bf16 autocast on GPU, as train_model.py trains there; plain float32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def loss_tolerance(device):
    """How far two implementations' losses on the same weights and batch may differ: float32 rounding on
    CPU, bf16 autocast's on GPU."""
    return 2e-2 if device.type == "cuda" else 1e-4


def train_step_fn(model, input_ids, labels, device, optimizer="adamw", reference=None):
    """One full training step as train_model.py does it: the loss (the language model's, or with a
    `reference` model DPO's against it, as --mode dpo), backward, the optimizer step (AdamW, or Muon for
    the blocks' matrices and AdamW for the rest)."""
    args = parse_train_args(["--optimizer", optimizer])
    optimizers = make_optimizers(model, args, choose_recipe(args), device)  # the default learning rates
    model.train()

    def step():
        with autocast_for(device):
            loss = model(input_ids=input_ids, labels=labels).loss if reference is None \
                else our_dpo_loss(model, reference, input_ids, labels)
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


# --- data pipelines --------------------------------------------------------------------------------

def count_useful_tokens(batch):
    """Positions that carry loss: labels are shifted by one in the model, so the first never does."""
    return int((batch["labels"][:, 1:] != -100).sum())


def packed_batches(data_path, tokenizer, max_len, batch_size):
    """Our pretraining pipeline: documents joined by <|endoftext|>, cut into full blocks, no padding."""
    from torch.utils.data import DataLoader
    dataset = PretrainDataset(data_path, tokenizer, max_len, batch_size=batch_size)
    return DataLoader(dataset, batch_size=batch_size,
                      collate_fn=partial(collate, pad_id=tokenizer.pad_token_id))


def training_texts(data_path, val_every=200):
    """The documents PretrainDataset trains on: all lines but every val_every-th (its validation)."""
    return (text for _, text in read_records(data_path, parse_text, keep=lambda n: n % val_every != 0,
                                             report_after=None))


def padded_batches(texts, tokenizer, max_len, batch_size):
    """The peers' pipeline: one document per row, tokenized + <|endoftext|>, truncated or padded to
    max_len (the model's max_seq_len, as in a collator with padding="max_length"), labels -100 on
    padding. Yields {"input_ids", "labels"} of shape (batch, max_len); the last batch may be short."""
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    texts = iter(texts)
    while chunk := list(itertools.islice(texts, batch_size)):
        input_ids = torch.full((len(chunk), max_len), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(chunk), max_len), -100, dtype=torch.long)
        for row, ids in enumerate(tokenizer(chunk, add_special_tokens=False)["input_ids"]):
            ids = torch.tensor((ids + [eos])[:max_len], dtype=torch.long)
            input_ids[row, :len(ids)] = ids
            labels[row, :len(ids)] = ids
        yield {"input_ids": input_ids, "labels": labels}


def useful_per_row(batches):
    """(mean useful tokens per row, first batch) over a whole pipeline, from the actual data."""
    useful = rows = 0
    first = None
    for batch in batches:
        first = batch if first is None else first
        useful += count_useful_tokens(batch)
        rows += len(batch["labels"])
    return useful / rows, first


# --- generation ------------------------------------------------------------------------------------

def natural_scale_init(model):
    """Matmul weights at std 1/sqrt(fan_in). At the usual 0.02 a random model's greedy output repeats
    one token, which would make the identity check of section 3 nearly empty; at this scale the
    tokens vary. (The embedding, tied to the output, keeps 0.02.)"""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and name != "tok_embeddings.weight":
                param.normal_(0.0, param.shape[1] ** -0.5)


@torch.no_grad()
def generate_recompute(model, input_ids, new_tokens):
    """The peers' way without a cache: a full forward over the whole context for every new token."""
    tokens = input_ids
    for _ in range(new_tokens):
        next_token = model(tokens).logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens


def generation_methods(ours, hf, input_ids, new_tokens, device, compile=False):
    """The greedy generators, each returning prompt + new_tokens ids; nothing stops early."""
    ours.eval()
    hf.eval()
    hf.generation_config.eos_token_id = None  # its default eos (2) could stop it before new_tokens
    ones = torch.ones_like(input_ids)

    def with_autocast(fn):
        def run():
            with autocast_for(device):
                return fn()
        return run
    def ours_greedy(compiled):
        return with_autocast(lambda: ours.generate(input_ids, new_tokens, temperature=0, eos_token_id=None,
                                                   compile=compiled))
    methods = {
        "ours": ours_greedy(compiled=False),
        "hf": with_autocast(lambda: hf.generate(input_ids, attention_mask=ones, max_new_tokens=new_tokens,
                                                do_sample=False, pad_token_id=0)),
        "recompute": with_autocast(lambda: generate_recompute(ours, input_ids, new_tokens)),
    }
    if compile:
        methods["ours_compiled"] = ours_greedy(compiled=True)
    return methods


def linear_weights(model):
    """The weight of every matmul with a weight, in forward order: wq ... w3 of each layer, the lm_head."""
    return [module.weight.detach() for module in model.modules() if isinstance(module, nn.Linear)]


def train_matmuls(model, tokens):
    """Only the weight matmuls of a training step on `tokens` tokens: forward, then for each weight
    the input gradient and the weight gradient, 6 FLOPs per weight and token (attention's matmuls are
    left out, so the floor this sets is, if anything, too low)."""
    weights = linear_weights(model)
    inputs = {w: torch.randn(tokens, w.shape[1], device=w.device, dtype=w.dtype) for w in weights}
    grads = {w: torch.randn(tokens, w.shape[0], device=w.device, dtype=w.dtype) for w in weights}

    def run():
        with torch.no_grad(), autocast_for(weights[0].device):
            for w in weights:
                F.linear(inputs[w], w)
            for w in reversed(weights):
                grads[w] @ w
                grads[w].t() @ inputs[w]
    return run


def decode_matmuls(model, new_tokens):
    """Only the weight matmuls of greedy decoding: one row through every weight, for each new token.
    At batch 1 each token streams every weight from memory once, whatever the implementation."""
    weights = linear_weights(model)
    rows = {w: torch.randn(1, w.shape[1], device=w.device, dtype=w.dtype) for w in weights}

    def run():
        with torch.no_grad(), autocast_for(weights[0].device):
            for _ in range(new_tokens):
                for w in weights:
                    F.linear(rows[w], w)
    return run


def first_difference(a, b):
    """First position where two id sequences differ, or None."""
    if a.shape != b.shape:
        return min(a.shape[-1], b.shape[-1])
    diff = (a != b).nonzero()
    return None if len(diff) == 0 else int(diff[0, -1])


# --- the sections ----------------------------------------------------------------------------------

def bench_train(args, sizes, tokenizer, device, log):
    """Section 1 (and the measurements of section 5): train step tokens/s, ours against HF."""
    seq = sizes["train_seq_len"] or CONFIGS[args.config]["train_seq_len"]
    blocks = itertools.islice(PretrainDataset(args.data_path, tokenizer, seq), sizes["batch_size"])
    batch = collate(list(blocks), pad_id=tokenizer.pad_token_id)  # real text, as training sees it
    input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    tokens = input_ids.numel()
    config = model_config(args.config, len(tokenizer), seq)
    ours, hf = ours_and_hf(config, device, args.seed)
    with torch.no_grad(), autocast_for(device):
        loss_ours = float(ours(input_ids, labels=labels).loss)
        loss_hf = float(hf(input_ids=input_ids, labels=labels).loss)
    contenders = {"ours": train_step_fn(ours, input_ids, labels, device),
                  "hf": train_step_fn(hf, input_ids, labels, device),
                  # Its own copy of the weights: Muon's steps must not change what the others train.
                  "ours_muon": train_step_fn(copy.deepcopy(ours), input_ids, labels, device, "muon")}
    compile_seconds = None
    if args.compile:
        compiled = torch.compile(copy.deepcopy(ours))  # its own weights and optimizer state
        step = train_step_fn(compiled, input_ids, labels, device)
        log("compiling our model (forward and backward)")
        start = time.perf_counter()
        step()
        step()
        synchronize(device)
        compile_seconds = time.perf_counter() - start
        contenders["ours_compiled"] = step
    contenders["matmuls_only"] = train_matmuls(ours, tokens)
    # The matmul peak of section 5 runs as one more contender, so it sees the same load as the steps.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peaks = []

    def matmul_peak():
        clock = clock_for(device)
        clock_start, wall_start = clock(), time.perf_counter()
        flops = measure_matmul_flops(device, dtype, seconds=0.4)  # as train_model.py measures it
        # It divides by wall time; rescale to the bench's clock (a no-op when that is wall time). Its
        # set-up counts in the wall time too, so the peak comes out a few percent high, MFU low.
        peaks.append(flops * (time.perf_counter() - wall_start) / (clock() - clock_start))
    contenders["matmul_peak"] = matmul_peak
    log(f"timing {', '.join(contenders)} in alternating rounds")
    seconds, _ = race(contenders, device, sizes["train_rounds"], sizes["train_budget_s"])
    result = {
        "batch_size": sizes["batch_size"], "seq_len": seq, "params": ours.num_params(),
        "dtype": "bfloat16 autocast" if device.type == "cuda" else "float32",
        "loss_ours": loss_ours, "loss_hf": loss_hf,
        "same_loss": abs(loss_ours - loss_hf) < loss_tolerance(device),
        "tokens_per_s": {name: tokens / best(seconds[name]) for name in contenders
                         if name not in ("matmul_peak", "matmuls_only")},
        "matmuls_only_tokens_per_s": tokens / best(seconds["matmuls_only"]),
        "ratio_eager": speedup(seconds["ours"], seconds["hf"]),
        "ceiling_vs_hf": speedup(seconds["matmuls_only"], seconds["hf"]),
        "rounds": len(seconds["ours"]), "flops_per_token": ours.flops_per_token(seq),
        "peak_flops": max(peaks), "peak_dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
        "seconds": seconds,
    }
    if args.compile:
        result["ratio_compiled"] = speedup(seconds["ours_compiled"], seconds["hf"])
        result["compile_seconds"] = compile_seconds
    return result


def bench_useful_tokens(args, sizes, tokenizer, device, log):
    """Section 2: useful tokens/s of our packed pipeline against padding every document."""
    max_len, batch_size = sizes["pack_len"], sizes["batch_size"]
    log(f"counting the useful tokens of both pipelines over {args.data_path}")
    packed_row, packed = useful_per_row(packed_batches(args.data_path, tokenizer, max_len, batch_size))
    padded_row, padded = useful_per_row(padded_batches(training_texts(args.data_path), tokenizer, max_len,
                                                       batch_size))
    torch.manual_seed(args.seed)
    model = Transformer(model_config(args.config, len(tokenizer), max_len)).to(device)
    # One model and one optimizer for both: only the batches differ. Both have shape (batch, max_len).
    contenders = {name: train_step_fn(model, b["input_ids"].to(device), b["labels"].to(device), device)
                  for name, b in (("packed", packed), ("padded", padded))}
    log("timing a training step on each in alternating rounds")
    seconds, _ = race(contenders, device, sizes["pack_rounds"], sizes["pack_budget_s"])
    useful = {"packed": packed_row * batch_size, "padded": padded_row * batch_size}
    useful_per_s = {name: useful[name] / best(seconds[name]) for name in seconds}
    return {
        "max_len": max_len, "batch_size": batch_size, "rounds": len(seconds["packed"]),
        "useful_per_batch": useful, "step_seconds": {name: best(s) for name, s in seconds.items()},
        "useful_tokens_per_s": useful_per_s, "ratio": useful_per_s["packed"] / useful_per_s["padded"],
    }


def bench_generation(args, sizes, tokenizer, device, log):
    """Section 3: greedy tokens/s of our KV-cache generate, HF generate and full recomputation."""
    new_tokens, prompt_len = sizes["new_tokens"], sizes["prompt_len"]
    max_len = max(sizes["pack_len"], prompt_len + new_tokens)
    ours, hf = ours_and_hf(model_config(args.config, len(tokenizer), max_len), device, args.seed,
                           init=natural_scale_init)
    text = next(training_texts(args.data_path))
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"][:prompt_len]
    input_ids = torch.tensor([prompt], dtype=torch.long, device=device)
    # Warm up on a few tokens: a full recompute run is the slowest thing in the bench.
    race(generation_methods(ours, hf, input_ids, 4, device), device, (1, 1), 0, warmup=0)
    methods = generation_methods(ours, hf, input_ids, new_tokens, device, args.compile)
    compile_seconds = None
    if args.compile:  # compile with the timed shapes: another cache length would compile once more
        start = time.perf_counter()
        methods["ours_compiled"]()
        compile_seconds = time.perf_counter() - start
    methods["matmuls_only"] = decode_matmuls(ours, new_tokens)
    log(f"timing {new_tokens} new tokens with {', '.join(methods)} in alternating rounds")
    seconds, outputs = race(methods, device, sizes["gen_rounds"], sizes["gen_budget_s"], warmup=0)
    outputs = {name: ids.cpu() for name, ids in outputs.items() if ids is not None}
    compared = [name for name in ("hf", "recompute", "ours_compiled") if name in outputs]
    result = {
        "prompt_len": len(prompt), "new_tokens": new_tokens, "rounds": len(seconds["ours"]),
        "tokens_per_s": {name: new_tokens / best(s) for name, s in seconds.items()},
        "ratio_vs_hf": speedup(seconds["ours"], seconds["hf"]),
        "ratio_vs_recompute": speedup(seconds["ours"], seconds["recompute"]),
        "ceiling_vs_hf": speedup(seconds["matmuls_only"], seconds["hf"]),
        "identical": {name: first_difference(outputs["ours"], outputs[name]) is None for name in compared},
        "first_difference": {name: first_difference(outputs["ours"], outputs[name]) for name in compared},
        "new_distinct_tokens": len(set(outputs["ours"][0, len(prompt):].tolist())),
    }
    if args.compile:
        result["ratio_compiled_vs_hf"] = speedup(seconds["ours_compiled"], seconds["hf"])
        result["compile_seconds"] = compile_seconds
    return result


def bench_data(args, sizes, tokenizer, train_tokens_per_s, log):
    """Section 4: JSONL to token ids through PretrainDataset, all blocks of the file, against
    train_tokens_per_s (None when section 1 failed: no ratio then)."""
    with open_binary(args.data_path) as f:
        size = sum(len(line) for line in f)  # uncompressed bytes
    log(f"tokenizing {size / 1e6:.1f} MB through PretrainDataset")
    dataset = PretrainDataset(args.data_path, tokenizer, sizes["pack_len"])
    start = time.perf_counter()
    blocks = sum(1 for _ in dataset)
    seconds = time.perf_counter() - start
    tokens_per_s = blocks * sizes["pack_len"] / seconds
    return {"bytes": size, "seconds": seconds, "blocks": blocks, "mb_per_s": size / 1e6 / seconds,
            "tokens_per_s": tokens_per_s, "train_tokens_per_s": train_tokens_per_s,
            "ratio": None if train_tokens_per_s is None else tokens_per_s / train_tokens_per_s,
            **bench_token_cache(args, sizes, tokenizer, log)}


def bench_token_cache(args, sizes, tokenizer, log):
    """The token cache: its build with 1 and 2 worker processes, in alternating rounds (the wall time of
    each build's fastest round; per core, the CPU time of the 1-worker build's worker, which a busy machine
    does not change), and the training loader reading it (one process, no workers, its CPU time)."""
    import resource
    from torch.utils.data import DataLoader
    with tempfile.TemporaryDirectory() as tmp:
        def build(workers):
            path = os.path.join(tmp, f"tokens{workers}.bin")
            for leftover in (path, path + ".json"):
                if os.path.exists(leftover):
                    os.remove(leftover)
            with contextlib.redirect_stdout(sys.stderr):  # its summary line must not break --json
                build_token_cache(PretrainDataset(args.data_path, tokenizer, sizes["pack_len"]), path,
                                  num_workers=workers)
            return path
        log("building the token cache with 1 and 2 worker processes")
        seconds, worker_cpu = {1: [], 2: []}, []
        for _ in range(sizes["cache_rounds"]):
            for workers in (1, 2):
                start, children = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
                path = build(workers)
                seconds[workers].append(time.perf_counter() - start)
                if workers == 1:  # the pool's worker has been reaped: its CPU time is counted
                    after = resource.getrusage(resource.RUSAGE_CHILDREN)
                    worker_cpu.append(after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime)
        tokens = os.path.getsize(path) // cache_dtype(tokenizer)(0).itemsize
        log("reading the token cache through the training loader")
        dataset = PretrainDataset(args.data_path, tokenizer, sizes["pack_len"], token_cache=path,
                                  batch_size=sizes["batch_size"])
        loader = DataLoader(dataset, batch_size=sizes["batch_size"],
                            collate_fn=partial(collate, pad_id=tokenizer.pad_token_id))
        start = time.process_time()  # one process: its CPU time is its time on one core
        read = sum(batch["input_ids"].numel() for batch in loader)
        loader_per_s = read / max(time.process_time() - start, 1e-9)
    build_per_s = {w: tokens / min(s) for w, s in seconds.items()}
    per_core = tokens / max(min(worker_cpu), 1e-9)
    return {"cache_tokens": tokens, "cache_build_tokens_per_s": build_per_s, "cache_build_tokens_per_core_s": per_core,
            "cache_2_workers_ratio": build_per_s[2] / build_per_s[1], "loader_tokens_per_s": loader_per_s,
            # Cores that keep the 215M recipe on one H200 fed: tokenizing live (streaming) or reading the cache.
            "h200_cores_streaming": H200_TOKENS_PER_S / per_core,
            "h200_cores_cache": H200_TOKENS_PER_S / loader_per_s}


def mfu(train):
    """Section 5: achieved FLOP/s (flops_per_token x tokens/s) over the measured matmul peak."""
    return {"flops_per_token": train["flops_per_token"], "peak_flops": train["peak_flops"],
            "peak_dtype": train["peak_dtype"],
            "mfu": {name: train["flops_per_token"] * tps / train["peak_flops"]
                    for name, tps in train["tokens_per_s"].items()}}


# --- report ----------------------------------------------------------------------------------------

def machine(device):
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    import transformers
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "device": str(device),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def row(section, figure, unit, ours, peer, ratio, goal=None):
    return dict(section=section, figure=figure, unit=unit, ours=ours, peer=peer, ratio=ratio, goal=goal,
                result=None if goal is None or ratio is None else ratio >= goal)


def train_rows(t):
    tps = t["tokens_per_s"]
    out = [row("1 train step", "eager vs HF eager", "tok/s", tps["ours"], tps["hf"], t["ratio_eager"],
               GOALS["train_eager"])]
    if "ours_compiled" in tps:
        out.append(row("1 train step", "compiled vs HF eager", "tok/s", tps["ours_compiled"], tps["hf"],
                       t["ratio_compiled"], GOALS["train_compiled"]))
    out.append(row("1 train step", "Muon vs AdamW (ours, eager)", "tok/s", tps["ours_muon"], tps["ours"],
                   tps["ours_muon"] / tps["ours"], GOALS["muon_vs_adamw"]))
    out.append(row("1 train step", "ceiling: matmuls alone vs HF", "tok/s", t["matmuls_only_tokens_per_s"],
                   tps["hf"], t["ceiling_vs_hf"]))
    return out


def train_notes(t):
    return [f"1: batch {t['batch_size']} x {t['seq_len']} tokens, forward with labels + backward + AdamW, "
            f"{plural(t['rounds'], 'round')}; "
            f"same loss at start: {t['same_loss']} ({t['loss_ours']:.5f} vs {t['loss_hf']:.5f})"
            + (f"; compiling took {t['compile_seconds']:.0f} s" if "compile_seconds" in t else ""),
            "ceiling: the model's weight matmuls alone, in the step's order (forward and both gradients, "
            "attention left out): no implementation beats HF by more than this ratio"]


def mfu_rows(m):
    m = m["mfu"]
    out = [row("5 MFU", "eager vs HF eager", "%", 100 * m["ours"], 100 * m["hf"], m["ours"] / m["hf"])]
    if "ours_compiled" in m:
        out.append(row("5 MFU", "compiled vs HF eager", "%", 100 * m["ours_compiled"], 100 * m["hf"],
                       m["ours_compiled"] / m["hf"]))
    return out


def mfu_notes(m):
    return [f"5: FLOPs/token = 6 x matmul weights + 6 x n_layers x dim x seq (causal attention counted once) "
            f"= {m['flops_per_token'] / 1e6:.1f} MFLOP; peak = measured {m['peak_dtype']} matmul "
            f"{m['peak_flops'] / 1e9:,.1f} GFLOP/s (train_model.measure_matmul_flops, as training logs MFU)"]


def useful_rows(u):
    per_batch = u["useful_per_batch"]
    return [row("2 useful tokens", "packed vs padded", "tok/s", u["useful_tokens_per_s"]["packed"],
                u["useful_tokens_per_s"]["padded"], u["ratio"], GOALS["useful_tokens"]),
            row("2 useful tokens", "per batch", "tok", per_batch["packed"], per_batch["padded"],
                per_batch["packed"] / per_batch["padded"])]


def useful_notes(u):
    return [f"2: batch {u['batch_size']} x {u['max_len']}, {plural(u['rounds'], 'round')}; useful = "
            f"labels[:, 1:] != -100; step {u['step_seconds']['packed']:.3f} s packed, "
            f"{u['step_seconds']['padded']:.3f} s padded"]


def generation_rows(g):
    tps = g["tokens_per_s"]
    out = [row("3 generation", "KV cache vs HF generate", "tok/s", tps["ours"], tps["hf"], g["ratio_vs_hf"])]
    if "ours_compiled" in tps:
        out.append(row("3 generation", "compiled vs HF generate", "tok/s", tps["ours_compiled"], tps["hf"],
                       g["ratio_compiled_vs_hf"], GOALS["gen_vs_hf"]))
    return out + [
        row("3 generation", "KV cache vs recompute", "tok/s", tps["ours"], tps["recompute"],
            g["ratio_vs_recompute"], GOALS["gen_vs_recompute"]),
        row("3 generation", "ceiling: matmuls alone vs HF", "tok/s", tps["matmuls_only"], tps["hf"],
            g["ceiling_vs_hf"]),
    ]


def generation_notes(g):
    return [f"3: {g['new_tokens']} new tokens after a {g['prompt_len']}-token prompt, greedy, batch 1, "
            f"{plural(g['rounds'], 'round')}; eager's tokens the same "
            + ", ".join(f"as {name}: {same}" for name, same in g["identical"].items())
            + f" ({g['new_distinct_tokens']} distinct new tokens)"
            + (f"; compiling took {g['compile_seconds']:.0f} s" if "compile_seconds" in g else ""),
            "ceiling: the model's weight matmuls alone, one row per new token"]


def data_rows(d):
    return [row("4 data prep", "tokenize vs train (ours)", "tok/s", d["tokens_per_s"], d["train_tokens_per_s"],
                d["ratio"], GOALS["data_vs_train"]),
            row("4 data prep", "JSONL throughput", "MB/s", d["mb_per_s"], None, None),
            row("4 data prep", "cache build per core (CPU time)", "tok/s", d["cache_build_tokens_per_core_s"],
                None, None),
            row("4 data prep", "cache build: 2 workers vs 1", "tok/s", d["cache_build_tokens_per_s"][2],
                d["cache_build_tokens_per_s"][1], d["cache_2_workers_ratio"], GOALS["cache_2_workers"]),
            row("4 data prep", "cache loader vs 1 H200 (215M)", "tok/s", d["loader_tokens_per_s"],
                H200_TOKENS_PER_S, d["loader_tokens_per_s"] / H200_TOKENS_PER_S, GOALS["loader_vs_h200"])]


def data_notes(d):
    return [f"4: {d['bytes'] / 1e6:.2f} MB of JSONL -> {d['blocks']} blocks in {d['seconds']:.2f} s "
            f"(wall time, one pass); peer: our eager training tokens/s of section 1",
            f"4: token cache of {d['cache_tokens']:,} tokens; the loader reads it on one core (CPU time); "
            f"the 215M recipe on one H200 ({H200_TOKENS_PER_S:,} tok/s) needs "
            f"{d['h200_cores_streaming']:.1f} cores tokenizing live, {d['h200_cores_cache']:.2f} reading the cache"]


def plural(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


def fmt(value):
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


# (name, width, alignment) of the table's columns: fixed, since rows are printed as they are measured.
COLUMNS = (("section", 16, "<"), ("figure", 29, "<"), ("unit", 5, "<"), ("ours", 11, ">"), ("peer", 11, ">"),
           ("ratio", 7, ">"), ("goal", 7, ">"), ("result", 6, ">"))


def table_line(cells):
    return "  ".join(f"{cell:{align}{width}}" for cell, (_, width, align) in zip(cells, COLUMNS)).rstrip()


def format_row(r):
    return table_line((r["section"], r["figure"], r["unit"], fmt(r["ours"]), fmt(r["peer"]),
                       "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
                       "-" if r["goal"] is None else f">={r['goal']:.3g}x",
                       "info" if r["result"] is None else ("PASS" if r["result"] else "FAIL")))


def print_header(results):
    mach, c = results["machine"], results["config"]
    threads = plural(mach["torch_threads"], "torch thread")
    print(f"Tiny-LLM bench: {mach['cpu']}, {mach['cores']} cores ({threads}), "
          f"torch {mach['torch']}, transformers {mach['transformers']}, device {mach['device']}"
          + (f" ({mach['gpu']})" if "gpu" in mach else "")
          + ("" if mach["load_average"] is None else f", load average {mach['load_average']:.2f} at start"))
    print(f"model {results['settings']['config']}: dim {c['dim']}, {c['n_layers']} layers, "
          f"{c['n_heads']} heads, {c['n_kv_heads']} kv heads, vocab {c['vocab_size']}, "
          f"{c['params'] / 1e6:.2f}M parameters; {c['dtype']}; peer: transformers LlamaForCausalLM (sdpa) "
          "on the same weights")
    print(table_line([name for name, _, _ in COLUMNS]), flush=True)


def print_footer(results):
    print("every figure: the fastest of alternating rounds (load only adds time); ratio = ours / peer")
    if results["settings"]["quick"]:
        print("--quick: smoke-test sizes, too small for the goals to mean anything; run without it")
    for key, error in results["errors"].items():
        print(f"section {key} FAILED: {error}")


# --- against TRL: SFT, DPO and LoRA SFT (python bench.py --trl [MODEL_DIR]) --------------------------

# The README's LoRA run: rank 16, alpha 32, on train_model.py's default targets (attention and MLP).
TRL_LORA = argparse.Namespace(lora_rank=16, lora_alpha=32.0, lora_dropout=0.0, lora_targets=",".join(LORA_TARGETS))
TRL_DATA = {"sft": "data/sft_poetry.jsonl.gz", "dpo": "data/dpo_poetry.jsonl.gz"}  # shipped, beside bench.py


def shipped(path):
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), path)


def trl_models(args, tokenizer, device):
    """Our Transformer and LlamaForCausalLM with the same weights: --trl's model, or a random one of
    --config's shape."""
    from transformers import AutoModelForCausalLM
    if not args.trl:
        return ours_and_hf(model_config(args.config, len(tokenizer), 1024), device, args.seed)
    ours = Transformer.from_pretrained(args.trl, strict=True)
    hf = AutoModelForCausalLM.from_pretrained(args.trl, dtype=torch.float32, attn_implementation="sdpa")
    return ours.to(device), hf.to(device)


def trl_config(config_class, out_dir, batch_size, device, seed, **kwargs):
    """TRL's arguments for one step as section 1's: AdamW at 3e-4 with betas (0.9, 0.95) and weight decay
    0.1, bf16 on GPU, float32 on CPU; nothing logged, saved or evaluated."""
    return config_class(output_dir=out_dir, per_device_train_batch_size=batch_size, learning_rate=3e-4,
                        adam_beta2=0.95, weight_decay=0.1, bf16=device.type == "cuda",
                        use_cpu=device.type == "cpu", report_to="none", save_strategy="no",
                        logging_strategy="no", eval_strategy="no", dataloader_num_workers=0, seed=seed,
                        disable_tqdm=True, **kwargs)


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


def our_dpo_loss(model, reference, input_ids, labels, beta=0.1):
    """train_model.py --mode dpo's loss of a preference batch against a frozen reference model."""
    from modes import dpo_loss, sequence_log_probs
    with torch.no_grad():
        reference_log_probs = sequence_log_probs(reference(input_ids).logits, labels)
    return dpo_loss(model(input_ids).logits, reference_log_probs, labels, beta, labels.shape[0] // 2)[0]


def dpo_trl_inputs(trainer, labels, input_ids):
    """Our preference batch (chosen rows, then rejected) in TRL's form: prompt_ids, and each answer as the
    tokens from the first labelled one to the last (the template's newline after <|im_end|> is ours but
    unlabelled; TRL would label it, so it is left out: it cannot change the log-probabilities before it)."""
    chosen, rejected = labels.chunk(2)
    examples = []
    for row, (c, r) in enumerate(zip(chosen, rejected)):
        c_pos, r_pos = (c != -100).nonzero().flatten(), (r != -100).nonzero().flatten()
        start = int(c_pos[0])
        ids_c, ids_r = input_ids[row], input_ids[len(chosen) + row]
        assert int(r_pos[0]) == start and torch.equal(ids_c[:start], ids_r[:start])
        examples.append({"prompt_ids": ids_c[:start].tolist(),
                         "chosen_ids": ids_c[start:int(c_pos[-1]) + 1].tolist(),
                         "rejected_ids": ids_r[start:int(r_pos[-1]) + 1].tolist()})
    return trainer._prepare_inputs(trainer.data_collator(examples))


def bench_trl(args, device):
    """Our SFT, DPO and LoRA SFT steps against TRL's SFTTrainer, DPOTrainer and SFTTrainer + PEFT on the same
    weights and batch: tokens/s (every token of the batch, padding included, the same for both) and the
    first step's loss of each."""
    import peft
    import trl
    from datasets import Dataset, disable_progress_bars
    from transformers import AutoTokenizer
    from corpus import parse_conversation, parse_preference
    from dataset import PreferenceDataset, encode_conversation
    from lora import adapter_hf_name, add_lora, is_lora_weight, lora_hf_names, lora_target_names
    from modes import sequence_log_probs
    disable_progress_bars()
    if args.trl and not os.path.isfile(os.path.join(args.trl, "model.safetensors")):
        sys.exit(f"error: --trl {args.trl}: holds no model.safetensors; pass a directory written by train_model.py")
    sizes = SIZES["quick" if args.quick else "full"]
    n, seq = sizes["batch_size"], sizes["train_seq_len"] or CONFIGS[args.config]["train_seq_len"]
    tokenizer = AutoTokenizer.from_pretrained(args.trl if args.trl and os.path.isfile(
        os.path.join(args.trl, "tokenizer.json")) else args.tokenizer_path)
    conversations = [m for _, m in itertools.islice(read_records(shipped(TRL_DATA["sft"]), parse_conversation), n)]
    pairs = [p for _, p in itertools.islice(read_records(shipped(TRL_DATA["dpo"]), parse_preference), n)]
    sft = collate([encode_conversation(tokenizer, m, seq) for m in conversations], tokenizer.pad_token_id)
    preference_data = PreferenceDataset(shipped(TRL_DATA["dpo"]), tokenizer, seq)
    dpo = collate_preferences([preference_data._encode(p) for p in pairs], tokenizer.pad_token_id)
    ours, hf = trl_models(args, tokenizer, device)
    results = {"machine": machine(device), "trl": trl.__version__, "peft": peft.__version__,
               "model": args.trl or f"random, --config {args.config}", "params": ours.num_params(),
               "batch_size": n, "seq_len": seq, "tolerance": loss_tolerance(device), "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        def sft_trainer(model, **kwargs):
            return trl.SFTTrainer(model=model, processing_class=tokenizer,
                              train_dataset=Dataset.from_list([{"messages": m} for m in conversations]),
                              args=trl_config(trl.SFTConfig, tmp, n, device, args.seed, max_length=seq,
                                              assistant_only_loss=True), **kwargs)

        def sft_inputs(trainer):
            """TRL's own batch (its tokenization and masking of our conversations), checked against ours."""
            inputs = trainer._prepare_inputs(trainer.data_collator(list(trainer.train_dataset)))
            same = torch.equal(inputs["input_ids"].cpu(), sft["input_ids"]) and \
                torch.equal(inputs["labels"].cpu(), sft["labels"])
            return inputs, same

        ids, labels = sft["input_ids"].to(device), sft["labels"].to(device)
        pref_ids, pref_labels = dpo["input_ids"].to(device), dpo["labels"].to(device)
        # Each contender trains its own copy of the weights.
        ours_lora = add_lora(copy.deepcopy(ours), TRL_LORA)
        trl_sft = sft_trainer(copy.deepcopy(hf))
        hf_targets = [lora_hf_names()[t] for t in lora_target_names(TRL_LORA.lora_targets)]  # q_proj, ...
        trl_lora = sft_trainer(copy.deepcopy(hf), peft_config=peft.LoraConfig(
            r=TRL_LORA.lora_rank, lora_alpha=TRL_LORA.lora_alpha, lora_dropout=TRL_LORA.lora_dropout,
            target_modules=hf_targets, task_type="CAUSAL_LM"))
        trl_dpo = trl.DPOTrainer(
            model=copy.deepcopy(hf), ref_model=copy.deepcopy(hf).eval(), processing_class=tokenizer,
            train_dataset=Dataset.from_list([dict(zip(("prompt", "chosen", "rejected"), p)) for p in pairs]),
            args=trl_config(trl.DPOConfig, tmp, n, device, args.seed, beta=0.1, loss_type=["sigmoid"], max_length=seq))
        sft_batch, sft_same = sft_inputs(trl_sft)
        lora_batch, lora_same = sft_inputs(trl_lora)
        dpo_batch = dpo_trl_inputs(trl_dpo, dpo["labels"], dpo["input_ids"])
        reference = copy.deepcopy(ours).eval().requires_grad_(False)
        # PEFT starts B at zero, which would make the first LoRA loss the base model's whatever the adapters:
        # both get the same nonzero adapters, as after some training, so the loss checks targets and scale.
        with torch.no_grad():
            for name, p in ours_lora.named_parameters():
                if ".lora_B." in name:
                    p.normal_(std=0.02)
        peft.set_peft_model_state_dict(trl_lora.model, {adapter_hf_name(k): v for k, v in ours_lora.state_dict().items()
                                                        if is_lora_weight(k)})

        def dpo_figures(loss, logits):
            """The loss, then the mean log-probabilities of the chosen and the rejected answers."""
            chosen, rejected = sequence_log_probs(logits, pref_labels).chunk(2)
            return float(loss), float(chosen.mean()), float(rejected.mean())

        def trl_dpo_figures():
            loss, logged = trl_dpo.compute_loss(trl_dpo.model, dpo_batch), trl_dpo._metrics["train"]
            return float(loss), logged["logps/chosen"][-1], logged["logps/rejected"][-1]
        # name: (our step, TRL's, tokens per step, same batch, first figures of ours, of TRL's: loss first)
        races = {
            "SFT (SFTTrainer)": (
                train_step_fn(copy.deepcopy(ours), ids, labels, device), trainer_step_fn(trl_sft, sft_batch),
                ids.numel(), sft_same, lambda: (float(ours(ids, labels=labels).loss),),
                lambda: (float(trl_sft.compute_loss(trl_sft.model, sft_batch)),)),
            "DPO (DPOTrainer)": (
                train_step_fn(copy.deepcopy(ours), pref_ids, pref_labels, device, reference=reference),
                trainer_step_fn(trl_dpo, dpo_batch), pref_ids.numel(), None,  # ours, given to TRL's collator
                lambda: dpo_figures(our_dpo_loss(ours, reference, pref_ids, pref_labels), ours(pref_ids).logits),
                trl_dpo_figures),
            "LoRA SFT (SFTTrainer+PEFT)": (
                train_step_fn(ours_lora, ids, labels, device), trainer_step_fn(trl_lora, lora_batch),
                ids.numel(), lora_same, lambda: (float(ours_lora(ids, labels=labels).loss),),
                lambda: (float(trl_lora.compute_loss(trl_lora.model, lora_batch)),)),
        }
        for name, (ours_step, trl_step, tokens, same_batch, ours_first, trl_first) in races.items():
            with torch.no_grad(), autocast_for(device):  # the weights both start the race with
                first = {"ours": ours_first(), "trl": trl_first()}
            contenders = {"ours": ours_step, "trl": trl_step}
            if name == "SFT (SFTTrainer)":  # what TRL adds to a bare HF step (section 1's peer) on these weights
                contenders["hf"] = train_step_fn(copy.deepcopy(hf).train(), ids, labels, device)
            seconds, _ = race(contenders, device, sizes["train_rounds"], sizes["train_budget_s"])
            difference = max(abs(a - b) for a, b in zip(first["ours"], first["trl"]))
            results["rows"][name] = {
                "tokens_per_s": {k: tokens / best(v) for k, v in seconds.items()},
                "ratio": speedup(seconds["ours"], seconds["trl"]), "rounds": len(seconds["ours"]),
                "first": first, "difference": difference,
                "same_loss": all(math.isclose(a, b, rel_tol=loss_tolerance(device), abs_tol=loss_tolerance(device))
                                 for a, b in zip(first["ours"], first["trl"])), "same_batch": same_batch,
            }
    return results


def trl_rows(t):
    out = [row("TRL race", name, "tok/s", r["tokens_per_s"]["ours"], r["tokens_per_s"]["trl"], r["ratio"],
               GOALS["trl_step"]) for name, r in t["rows"].items()]
    tps = t["rows"]["SFT (SFTTrainer)"]["tokens_per_s"]
    return out + [row("TRL race", "SFT: ours vs bare HF", "tok/s", tps["ours"], tps["hf"], tps["ours"] / tps["hf"]),
                  row("TRL race", "SFT: bare HF vs SFTTrainer", "tok/s", tps["hf"], tps["trl"],
                      tps["hf"] / tps["trl"])]


def trl_header(t):
    mach = t["machine"]
    return [f"Tiny-LLM vs TRL {t['trl']} (peft {t['peft']}): {mach['cpu']}, {mach['cores']} cores "
            f"({plural(mach['torch_threads'], 'torch thread')}), torch {mach['torch']}, device {mach['device']}; "
            f"model {t['model']}, {t['params'] / 1e6:.2f}M parameters", table_line([name for name, _, _ in COLUMNS])]


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


# --- serving: serve.py under load (python bench.py --serve MODEL_DIR) -------------------------------

SERVE_QUESTIONS = ["请背诵《静夜思》", "《春晓》的作者是谁？", "写一首关于秋天的诗", "“床前明月光”出自哪首诗？",
                   "请背诵杜甫的《春望》", "《登鹳雀楼》是谁写的？", "你好", "“海内存知己”的下一句是什么？"]
BAD_BODIES = [b"{not json", b'{"messages": "hello"}', b'{"messages": [{"role": "wizard", "content": "hi"}]}',
              b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}', b'{"messages": []}']


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model_dir, log_path, *args, env=None, ready_timeout_s=120):
    """`python serve.py --model model_dir ARGS` on a free port of 127.0.0.1; yields (process, base URL) once
    /health answers. Its output goes to log_path."""
    import subprocess
    import httpx
    port = free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.py"),
                                    "--model", model_dir, "--host", "127.0.0.1", "--port", str(port),
                                    *map(str, args)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                with open(log_path) as f:
                    raise RuntimeError(f"serve.py did not start:\n{f.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield process, url
    finally:
        process.terminate()
        process.wait(timeout=30)


def stream_chat(client, url, question, max_tokens, leave_after=None, ignore_eos=False):
    """One streaming chat request: (seconds to the first text, completion tokens, finish reason, complete).
    leave_after: close the connection after that many events, as a client that goes away. ignore_eos: the
    answer runs to max_tokens (vLLM's extra field, as its serving benchmark uses for fixed lengths)."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0.7,
            "stream": True, "stream_options": {"include_usage": True}, **({"ignore_eos": True} if ignore_eos else {})}
    start, first, tokens, finish, done = time.perf_counter(), None, 0, None, False
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for count, line in enumerate(line for line in response.iter_lines() if line):
            if leave_after is not None and count == leave_after:
                return first, tokens, "left", False
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content") and first is None:
                    first = time.perf_counter() - start
                finish = choice["finish_reason"] or finish
    return first, tokens, finish, done and finish in ("stop", "length")


def clients_throughput(url, clients, seconds, max_tokens, headers, ignore_eos):
    """(aggregate generated tokens/s, tokens per answer) of `clients` streaming clients that each ask
    question after question for `seconds` (then finish the one they are on: every client has the same tail)."""
    import httpx
    from concurrent.futures import ThreadPoolExecutor
    start = time.perf_counter()

    def client_run(index):
        answers = []
        with httpx.Client(timeout=300, headers=headers) as client:
            for i in itertools.count(index):
                if time.perf_counter() - start > seconds:
                    return answers
                answers.append(stream_chat(client, url, SERVE_QUESTIONS[i % len(SERVE_QUESTIONS)], max_tokens,
                                           ignore_eos=ignore_eos)[1])

    with ThreadPoolExecutor(clients) as pool:
        answers = [tokens for answers in pool.map(client_run, range(clients)) for tokens in answers]
    return sum(answers) / (time.perf_counter() - start), sum(answers) / len(answers)


def mixed_load(url, pid, requests, clients, max_tokens, headers, log):
    """`requests` requests from `clients` threads; one in ten is malformed or (as often) leaves mid-stream.
    Checks every answer; samples the server's resident memory every tenth of the way."""
    import httpx
    import psutil
    from concurrent.futures import ThreadPoolExecutor
    kinds = ["good" if i % 10 else ("bad", "leave")[i // 10 % 2] for i in range(requests)]
    server = psutil.Process(pid)
    memory, outcomes = [server.memory_info().rss], []

    def one(i):
        with httpx.Client(timeout=300, headers=headers) as client:
            question = SERVE_QUESTIONS[i % len(SERVE_QUESTIONS)]
            if kinds[i] == "bad":
                response = client.post(f"{url}/v1/chat/completions", content=BAD_BODIES[i % len(BAD_BODIES)],
                                       headers={"Content-Type": "application/json"})
                error = response.json().get("error", {})
                return "bad", 400 <= response.status_code < 500 and bool(error.get("message"))
            if kinds[i] == "leave":
                stream_chat(client, url, question, max_tokens, leave_after=3)
                return "leave", True
            _, tokens, finish, complete = stream_chat(client, url, question, max_tokens)
            return "good", complete and (finish == "stop" or tokens == max_tokens)

    with ThreadPoolExecutor(clients) as pool:
        for i, outcome in enumerate(pool.map(one, range(requests)), 1):
            outcomes.append(outcome)
            if i % (requests // 10 or 1) == 0:
                memory.append(server.memory_info().rss)
                log(f"  {i}/{requests} requests, server RSS {memory[-1] / 1e6:.0f} MB")
    return {kind: {"sent": sum(k == kind for k, _ in outcomes), "as_expected": sum(k == kind and ok for k, ok in outcomes)}
            for kind in ("good", "bad", "leave")} | {"rss_mb": [m / 1e6 for m in memory]}


def measure_serving(url, pid, quick=False, requests=1000, api_key=None, log=lambda message: None):
    """The figures of a running serve.py (process pid at url): time to first token on the idle server,
    aggregate tokens/s of 8 streaming clients against 1, and a mixed load of valid, malformed and
    abandoned requests. The clients are threads of this process."""
    import httpx
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results = {}
    with httpx.Client(timeout=120, headers=headers) as client:
        stream_chat(client, url, "你好", 8)  # warm-up
        ttft = sorted(stream_chat(client, url, "你好", 4)[0] for _ in range(3 if quick else 20))
    results["ttft_ms"] = {"median": 1000 * ttft[len(ttft) // 2], "best": 1000 * ttft[0]}
    log(f"time to first token, idle: median {results['ttft_ms']['median']:.1f} ms")
    # Alternating rounds, the best of each (load only slows things down), as the sections above. Two
    # workloads: answers of max_tokens (what batching speeds up), and the model's own answers, which end
    # where it says (the demo's are ~13 tokens: each request's prompt pass and HTTP work weigh as much).
    rounds, seconds, max_tokens = (1, 1, 16) if quick else (3, 15, 128)
    results["tokens_per_s"] = {}
    for workload, ignore_eos in (("fixed_length", True), ("own_length", False)):
        one = eight = 0
        for _ in range(rounds):
            one = max(one, clients_throughput(url, 1, seconds, max_tokens, headers, ignore_eos)[0])
            tokens_per_s, tokens_per_answer = clients_throughput(url, 8, seconds, max_tokens, headers, ignore_eos)
            eight = max(eight, tokens_per_s)
        results["tokens_per_s"][workload] = {"one_client": one, "eight_clients": eight, "ratio": eight / one,
                                             "tokens_per_answer": tokens_per_answer, "max_tokens": max_tokens,
                                             "rounds": rounds, "seconds": seconds}
        log(f"tokens/s, {workload} answers ({tokens_per_answer:.0f} tokens): 1 client {one:.0f}, "
            f"8 clients {eight:.0f} ({eight / one:.2f}x)")
    results["mixed"] = mixed_load(url, pid, requests, 8, 32, headers, log)
    results["health"] = httpx.get(f"{url}/health").json()
    return results


def bench_serving(args):
    """serve.py on args.serve, in a process of its own, measured from this one."""
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:5.0f} s] {message}", file=sys.stderr, flush=True)

    requests = 40 if args.quick else args.serve_requests
    # One torch thread on CPU unless --threads says otherwise, for the reason given in main.
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or 1)} if args.device == "cpu" else None
    with tempfile.TemporaryDirectory() as tmp, \
            running_server(args.serve, os.path.join(tmp, "serve.log"), "--device", args.device,
                           "--max_batch_size", 8, *(["--compile"] if args.compile else []), env=env) as (process, url):
        log(f"serve.py up at {url}")
        results = {"machine": machine(torch.device(args.device)), "model": args.serve,
                   **measure_serving(url, process.pid, args.quick, requests, log=log)}
    results["seconds"] = time.perf_counter() - started
    if args.json:
        print(json.dumps(results, indent=2))
        return results
    m, t, r = results["machine"], results["tokens_per_s"], results["mixed"]
    print(f"Tiny-LLM serving bench: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, device {m['device']}"
          + ("" if m["load_average"] is None else f", load average {m['load_average']:.2f} at start")
          + f"; model {args.serve}")
    print(f"time to first token (idle server, short chat prompt, streaming): median "
          f"{results['ttft_ms']['median']:.1f} ms, best {results['ttft_ms']['best']:.1f} ms (goal < 100 ms)")
    for workload, w in t.items():
        print(f"aggregate generated tokens/s of streaming clients asking for {w['seconds']} s, {workload} answers "
              f"({w['tokens_per_answer']:.0f} tokens on average, max_tokens {w['max_tokens']}), best of {w['rounds']} "
              f"alternating rounds: 1 client {w['one_client']:.0f}, 8 clients {w['eight_clients']:.0f}: "
              f"{w['ratio']:.2f}x (goal >= 3x)")
    print(f"{requests} requests from 8 clients: valid {r['good']['as_expected']}/{r['good']['sent']} answered "
          f"in full, malformed {r['bad']['as_expected']}/{r['bad']['sent']} got a 4xx JSON error, "
          f"{r['leave']['sent']} left mid-stream; server RSS (MB) every tenth: "
          + " ".join(f"{mb:.0f}" for mb in r["rss_mb"]))
    print(f"server counters at the end: {results['health']['finished']}")
    return results


# --- speedrun: time to quality (python bench.py --speedrun) --------------------------------------------

# train.sh's demo pretraining: its model, data, batch and length. The recipes differ only in how they train.
SPEEDRUN_ARGS = ["--dim", "256", "--n_layers", "4", "--n_heads", "8", "--n_kv_heads", "4", "--max_seq_len", "256",
                 "--batch_size", "16", "--max_steps", "383", "--eval_interval", "50"]
SPEEDRUN_QUICK_ARGS = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "64",
                       "--batch_size", "4", "--max_steps", "6", "--eval_interval", "2", "--eval_batches", "2"]
RECIPES = {
    # train.sh's demo before Muon and WSD
    "adamw-cosine": ["--optimizer", "adamw", "--lr_schedule", "cosine", "--learning_rate", "2e-3",
                     "--warmup_iters", "30"],
    # train.sh's demo since: Muon at 8e-3, AdamW (the embedding and norms) at 2.4e-2, from a sweep at 383 steps
    # (README, Speed): final val_bpb 2.357 with both at 8e-3, 2.340 with AdamW's part at 1.6e-2, 2.317 at 2.4e-2.
    "muon-wsd": ["--optimizer", "muon", "--lr_schedule", "wsd", "--muon_learning_rate", "8e-3",
                 "--learning_rate", "2.4e-2", "--warmup_iters", "30"],
}
SPEEDRUN_GOALS = {"time_to_quality": 0.6, "final_bpb": 0.92}  # at most these ratios of the second to the first


def time_to_reach(points, target):
    """Seconds at which val_bpb first reaches target, interpolated linearly between the evaluations
    (elapsed_s, val_bpb) around it; None if it never does."""
    previous = (0.0, float("inf"))
    for seconds, bpb in points:
        if bpb <= target:
            if previous[1] == float("inf"):
                return seconds
            return previous[0] + (seconds - previous[0]) * (previous[1] - target) / (previous[1] - bpb)
        previous = (seconds, bpb)
    return None


def train_recipe(args, name, out_dir, log):
    """Pretrain with one recipe in a process of its own; [(elapsed_s, val_bpb)] of its evaluations."""
    import subprocess
    argv = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_model.py"),
            "--data_path", args.data_path, "--tokenizer_path", args.tokenizer_path, "--out_dir", out_dir,
            "--device", args.device, "--save_interval", "0", "--seed", str(args.seed),
            *(SPEEDRUN_QUICK_ARGS if args.quick else SPEEDRUN_ARGS), *RECIPES[name]]
    log(f"training {name}: {' '.join(argv[2:])}")
    shutil.rmtree(out_dir, ignore_errors=True)
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed: {done.stderr.strip().splitlines()[-1:]}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [(r["elapsed_s"], r["val_bpb"]) for r in records if "val_bpb" in r]


def bench_speedrun(args):
    """Two recipes, one after the other, on train.sh's demo pretraining: val_bpb against wall time, and each
    recipe's time to the worse of the two final val_bpb (the quality both reach). Each run is timed alone (an idle machine gives honest
    figures); its out_dir under --speedrun_dir is kept for report.py."""
    names = args.speedrun.split(",")
    assert len(names) == 2 and all(n in RECIPES for n in names), f"--speedrun takes two of {sorted(RECIPES)}"
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:5.0f} s] {message}", file=sys.stderr, flush=True)

    points = {name: train_recipe(args, name, os.path.join(args.speedrun_dir, name), log) for name in names}
    first, second = names
    final = {name: p[-1][1] for name, p in points.items()}
    seconds = {name: p[-1][0] for name, p in points.items()}
    target = max(final.values())
    results = {"machine": machine(torch.device(args.device)), "recipes": {n: RECIPES[n] for n in names},
               "points": points, "final_bpb": final, "seconds": seconds, "target_bpb": target,
               "time_to_target": {name: time_to_reach(p, target) for name, p in points.items()}}
    reached = results["time_to_target"]
    results["time_ratio"] = reached[second] / reached[first]
    results["bpb_ratio"] = final[second] / final[first]
    if args.json:
        print(json.dumps(results, indent=2))
        return results
    m = results["machine"]
    print(f"Tiny-LLM speedrun: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, device {m['device']}"
          + ("" if m["load_average"] is None else f", load average {m['load_average']:.2f} at start"))
    for name in names:
        print(f"{name} ({' '.join(RECIPES[name])}): val_bpb against wall time: "
              + ", ".join(f"{s:.0f} s {b:.4f}" for s, b in points[name]))
    print(f"time to val_bpb {target:.4f} (the worse final one): {first} {reached[first]:.0f} s, {second} "
          f"{reached[second]:.0f} s: {results['time_ratio']:.2f}x (goal <= {SPEEDRUN_GOALS['time_to_quality']}x)")
    print(f"final val_bpb: {first} {final[first]:.4f}, {second} {final[second]:.4f}: "
          f"{results['bpb_ratio']:.3f}x (goal <= {SPEEDRUN_GOALS['final_bpb']}x); plots: "
          f"python report.py {' '.join(os.path.join(args.speedrun_dir, n) for n in names)}")
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--config", default="demo", choices=sorted(CONFIGS))
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time our torch.compile'd training step and decoding step (default: on, off "
                        "with --quick; compiling takes about a minute on 2 CPU cores the first time, "
                        "seconds after)")
    p.add_argument("--quick", action="store_true", help="small sizes, one or two rounds: a smoke test")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--data_path", default="data/pretrain_poetry.jsonl.gz")
    p.add_argument("--tokenizer_path", default="custom_tokenizer")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads; default 1 on CPU (see main), torch's choice on GPU")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--serve", default=None, metavar="MODEL_DIR",
                   help="instead of the sections above, measure serve.py on this model (127.0.0.1 only): time "
                        "to first token, 8 streaming clients against 1, and a mixed load of requests")
    p.add_argument("--serve_requests", type=int, default=1000, help="requests of --serve's mixed load")
    p.add_argument("--speedrun", default=None, metavar="RECIPE,RECIPE",
                   help=f"instead of the sections above, pretrain the demo model with two recipes ({', '.join(RECIPES)}) "
                        "one after the other and compare val_bpb against wall time (about 2 x 8 minutes on 2 "
                        "idle cores; --quick: a tiny smoke run)")
    p.add_argument("--trl", nargs="?", const="", default=None, metavar="MODEL_DIR",
                   help="instead of the sections above, race our SFT, DPO and LoRA SFT steps against TRL's "
                        "SFTTrainer, DPOTrainer and SFTTrainer + PEFT on this model (without MODEL_DIR: a random "
                        "model of --config's shape)")
    p.add_argument("--speedrun_dir", default="runs/speedrun", help="where --speedrun's runs are kept")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.serve:
        return bench_serving(args)
    if args.speedrun:
        return bench_speedrun(args)
    if args.compile is None:
        args.compile = not args.quick
    device = torch.device(args.device)
    # One CPU thread by default. With two OpenMP threads on two cores that another job also uses, every
    # op waits at a barrier for whichever thread is descheduled: the demo train step then took 0.5 to
    # 14 s, while with one thread it took 0.9 to 1.4 s (and one thread can be timed by CPU time, see
    # clock_for). Ratios compare implementations, which one thread shows as well; on an idle machine,
    # --threads 2 gives the faster absolute figures.
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as train_model.py
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # stdout/stderr stay readable (and --json stays pure)
    hf_logging.set_verbosity_error()
    if args.trl is not None:
        results = bench_trl(args, device)
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            print("\n".join(trl_header(results) + [format_row(r) for r in trl_rows(results)] + trl_notes(results)))
        return results
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
    sizes = SIZES["quick" if args.quick else "full"]
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:5.0f} s] {message}", file=sys.stderr, flush=True)

    config = model_config(args.config, len(tokenizer), CONFIGS[args.config]["train_seq_len"])
    with torch.device("meta"):  # the parameter count without allocating the weights
        params = Transformer(config).num_params()
    results = {"machine": machine(device), "settings": {**vars(args), **sizes},
               "config": {**CONFIGS[args.config], "vocab_size": len(tokenizer), "params": params,
                          "dtype": "bfloat16 autocast" if device.type == "cuda" else "float32"},
               "rows": [], "errors": {}}
    if not args.json:
        print_header(results)

    def train_tokens_per_s():
        return results["train"]["tokens_per_s"]["ours"] if "train" in results else None

    def mfu_of_train():
        if "train" not in results:
            raise RuntimeError("needs the measurements of section 1, which failed")
        return mfu(results["train"])

    # (key, title, measure, rows, notes). Data preparation comes right after the train step, whose
    # tokens/s it is compared with.
    sections = [
        ("train", "1/5 train step", lambda: bench_train(args, sizes, tokenizer, device, log),
         train_rows, train_notes),
        ("mfu", "5/5 MFU", mfu_of_train, mfu_rows, mfu_notes),
        ("data_prep", "4/5 data preparation",
         lambda: bench_data(args, sizes, tokenizer, train_tokens_per_s(), log), data_rows, data_notes),
        ("useful_tokens", "2/5 useful tokens", lambda: bench_useful_tokens(args, sizes, tokenizer, device, log),
         useful_rows, useful_notes),
        ("generation", "3/5 generation", lambda: bench_generation(args, sizes, tokenizer, device, log),
         generation_rows, generation_notes),
    ]
    for key, title, measure, to_rows, notes in sections:
        log(title)
        try:
            results[key] = measure()
        except Exception as e:  # noqa: BLE001 -- one failing section must not cost the others' figures
            traceback.print_exc()
            results["errors"][key] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            if not args.json:
                print(f"{title}: FAILED: {results['errors'][key]}", flush=True)
            continue
        new_rows = to_rows(results[key])
        results["rows"] += new_rows
        if not args.json:  # printed as soon as measured: a run cut short keeps what it measured
            print("\n".join([format_row(r) for r in new_rows] + notes(results[key])), flush=True)
    results["seconds"] = time.perf_counter() - started
    log("done")
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_footer(results)
    return results


if __name__ == "__main__":
    sys.exit(1 if main().get("errors") else 0)
