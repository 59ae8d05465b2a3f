"""The race against Hugging Face transformers: five sections, each a figure of ours against a peer's,
with a goal (GOALS).

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

Contenders race in alternating rounds, each figure its fastest round (common.py says why). The
trade-offs: the train step runs on real text, as training sees it, and HF's model is loaded the way a
user of the peers' stack would load our checkpoint, so the race is the one a user would see, not the
best either side could do with other settings. The matmul peak runs as one more contender of section 1,
so that MFU divides by a peak measured under the same load. Each section's rows are printed as soon as
it ends, and a section that fails prints its error and lets the others run, so a run cut short (a GPU
lent for minutes) still leaves figures.
"""
import contextlib
import copy
import itertools
import json
import os
import sys
import tempfile
import time
import traceback
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import (best, clock_for, format_row, machine, plural, race, row, speedup, stderr_log,
                               table_header)
from corpus import open_binary, parse_text, read_records
from dataset import PretrainDataset, collate
from logger import measure_matmul_flops, synchronize
from model import ModelConfig, Transformer
from recipes import SHAPES, choose_recipe, make_optimizers
from token_cache import build_token_cache, cache_dtype
from train_model import parse_args as parse_train_args

# The model shapes of recipes.py (--config), each with the sequence length section 1 trains it at: the
# bench's own, whatever the shape's max_seq_len (the bench builds each model at the length it runs).
TRAIN_SEQ_LEN = {"demo": 256, "215m": 512, "tiny": 256}
CONFIGS = {name: {**{k: v for k, v in SHAPES[name].items() if k != "max_seq_len"}, "train_seq_len": seq}
           for name, seq in TRAIN_SEQ_LEN.items()}
# Run sizes. Section 1 trains at train_seq_len (None: the config's). pack_len: section 2's max_seq_len
# (the 215M recipe's 512), also the model length of section 3, which must hold prompt + new_tokens.
# *_rounds and *_budget_s: see common.race; a CPU run takes about 3 minutes, more on a loaded machine.
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
}
H200_TOKENS_PER_S = 300_000  # the 215M recipe on one H200 at about 40% MFU: what the data path must feed


# --- models ----------------------------------------------------------------------------------------

def model_config(name, vocab_size, max_seq_len):
    """The shape `name` of recipes.SHAPES, at this vocabulary size and length."""
    return ModelConfig(**{**SHAPES[name], "vocab_size": vocab_size, "max_seq_len": max_seq_len})


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


def train_step_fn(model, input_ids, labels, device, optimizer="adamw", loss_fn=None):
    """One full training step as train_model.py does it: the loss (the language model's, or
    loss_fn(model, input_ids, labels)), backward, the optimizer step (AdamW, or Muon for the blocks'
    matrices and AdamW for the rest)."""
    args = parse_train_args(["--optimizer", optimizer])
    optimizers = make_optimizers(model, args, choose_recipe(args), device)  # the default learning rates
    model.train()

    def step():
        with autocast_for(device):
            loss = model(input_ids=input_ids, labels=labels).loss if loss_fn is None \
                else loss_fn(model, input_ids, labels)
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
        for i, ids in enumerate(tokenizer(chunk, add_special_tokens=False)["input_ids"]):
            ids = torch.tensor((ids + [eos])[:max_len], dtype=torch.long)
            input_ids[i, :len(ids)] = ids
            labels[i, :len(ids)] = ids
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




# --- report ---

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
    print(table_header(), flush=True)


def print_footer(results):
    print("every figure: the fastest of alternating rounds (load only adds time); ratio = ours / peer")
    if results["settings"]["quick"]:
        print("--quick: smoke-test sizes, too small for the goals to mean anything; run without it")
    for key, error in results["errors"].items():
        print(f"section {key} FAILED: {error}")


# --- the run ---------------------------------------------------------------------------------------

def model_summary(name, tokenizer, device):
    """The config's shape, vocabulary, parameter count and precision, for the header and the JSON."""
    config = model_config(name, len(tokenizer), CONFIGS[name]["train_seq_len"])
    with torch.device("meta"):  # the parameter count without allocating the weights
        params = Transformer(config).num_params()
    return {**CONFIGS[name], "vocab_size": len(tokenizer), "params": params,
            "dtype": "bfloat16 autocast" if device.type == "cuda" else "float32"}


def sections(args, sizes, tokenizer, device, results, log):
    """(key, title, measure, rows, notes) of each section, in the order they run. Data preparation comes
    right after the train step, whose tokens/s it is compared with; MFU is computed from the train step's
    measurements."""
    def train_tokens_per_s():
        return results["train"]["tokens_per_s"]["ours"] if "train" in results else None

    def mfu_of_train():
        if "train" not in results:
            raise RuntimeError("needs the measurements of section 1, which failed")
        return mfu(results["train"])

    return [
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


def run(args, device):
    """The five sections on --config's model and --data_path: prints the table, each section's rows as soon
    as it ends (or the JSON at the end), and returns the results; a failed section is in results["errors"]."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
    sizes = SIZES["quick" if args.quick else "full"]
    started, log = time.perf_counter(), stderr_log()
    results = {"machine": machine(device), "settings": {**vars(args), **sizes},
               "config": model_summary(args.config, tokenizer, device), "rows": [], "errors": {}}
    if not args.json:
        print_header(results)
    for key, title, measure, to_rows, notes in sections(args, sizes, tokenizer, device, results, log):
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
