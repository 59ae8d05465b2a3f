"""CPU dtypes: our training step in float32 and under bf16 autocast, eager and compiled, and greedy
decoding in both, side by side in one run (python bench.py --cpu_dtype).

What it answers: on this CPU, how much faster is bf16 (it is only on CPUs with bf16 units: AMX, AVX512-BF16;
elsewhere torch emulates it), does torch.compile add to it, and does decoding gain too. MFU is each step's
model FLOPs per second over the matmul peak measured in the same dtype (logger.measure_matmul_flops), so
it says how much of the reachable speed the step uses, not how fast the dtype is.

The step is train_model.py's: forward with labels (the chunked loss), backward, AdamW. The two model sizes
are the demo's (dim 256, 4 layers, 16 x 256 tokens) and train_model.py's default (dim 512, 8 layers,
8 x 512 tokens). Contenders run in alternating rounds and each figure is its fastest round, as in the
other sections; a compiled contender's compilation is its warm-up call, timed and reported apart.
"""
import contextlib
import json
import time

import torch

from benchmarks.common import best, machine, machine_summary, race, stderr_log, use_threads
from hardware import cpu_bf16_units
from logger import measure_matmul_flops
from model import ModelConfig, Transformer
from recipes import SHAPES

# (shape, batch, sequence length): the demo's run, and train_model.py's default model at its length.
STEP_CASES = {"demo": ("demo", 16, 256), "default": (None, 8, 512)}
QUICK_STEP_CASES = {"tiny": ("tiny", 2, 64)}
DECODE = dict(prompt_len=16, new_tokens=64, batches=(1, 8))
QUICK_DECODE = dict(prompt_len=8, new_tokens=8, batches=(1,))
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}


def model_for(shape, vocab_size, seq_len):
    fields = {**(SHAPES[shape] if shape else {}), "vocab_size": vocab_size}
    fields["max_seq_len"] = max(seq_len, fields.get("max_seq_len", 0))
    config = ModelConfig(**fields)
    torch.manual_seed(0)
    return Transformer(config)


def autocast(dtype):
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast("cpu", dtype=dtype)


def train_step(model, input_ids, dtype, compiled):
    """One step of train_model.py's: loss, backward, AdamW; the model compiled in place or not."""
    if compiled:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with autocast(dtype):
            loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


def bench_steps(cases, vocab_size, rounds, budget_s, log):
    """{case: {contender: figures}} of the training step in each dtype, eager and compiled."""
    results = {}
    peaks = {name: measure_matmul_flops(torch.device("cpu"), dtype) for name, dtype in DTYPES.items()}
    for case, (shape, batch, seq_len) in cases.items():
        g = torch.Generator().manual_seed(1)
        input_ids = torch.randint(vocab_size, (batch, seq_len), generator=g)
        contenders, compile_seconds = {}, {}
        for name, dtype in DTYPES.items():
            for compiled in (False, True):
                label = f"{name}{' compiled' if compiled else ''}"
                step = train_step(model_for(shape, vocab_size, seq_len), input_ids, dtype, compiled)
                start = time.perf_counter()
                step()  # the warm-up; for a compiled step, the compilation
                compile_seconds[label] = time.perf_counter() - start
                contenders[label] = step
        log(f"{case}: compiled, racing {len(contenders)} steps")
        seconds, _ = race(contenders, torch.device("cpu"), rounds, budget_s, warmup=0)
        flops = model_for(shape, vocab_size, seq_len).flops_per_token(seq_len) * batch * seq_len
        results[case] = {label: {"ms": best(s) * 1e3, "first_call_s": compile_seconds[label],
                                 "mfu": flops / best(s) / peaks[label.split()[0]]}
                         for label, s in seconds.items()}
    return results, {name: peak / 1e9 for name, peak in peaks.items()}


def bench_decoding(vocab_size, settings, rounds, budget_s):
    """{batch: {dtype: tokens/s}} of greedy decoding with the demo model, eager, through its KV cache."""
    model = model_for("demo", vocab_size, 256).eval()
    results = {}
    for batch in settings["batches"]:
        g = torch.Generator().manual_seed(2)
        prompt = torch.randint(vocab_size, (batch, settings["prompt_len"]), generator=g)

        def decode(dtype):
            def run():
                with autocast(dtype):
                    return model.generate(prompt, settings["new_tokens"], temperature=0)
            return run
        seconds, _ = race({name: decode(dtype) for name, dtype in DTYPES.items()}, torch.device("cpu"), rounds,
                          budget_s)
        results[batch] = {name: batch * settings["new_tokens"] / best(s) for name, s in seconds.items()}
    return results


def bench_cpu_dtype(args, vocab_size, log):
    """The section's figures: {"units", "threads", "peak_gflops", "steps", "decode"}."""
    steps, peaks = bench_steps(QUICK_STEP_CASES if args.quick else STEP_CASES, vocab_size,
                               (1, 2) if args.quick else (3, 8), 2 if args.quick else 60, log)
    decode = bench_decoding(vocab_size, QUICK_DECODE if args.quick else DECODE,
                            (1, 2) if args.quick else (2, 6), 2 if args.quick else 30)
    return {"units": cpu_bf16_units(), "threads": torch.get_num_threads(), "peak_gflops": peaks,
            "steps": steps, "decode": decode}


def print_cpu_dtype(results):
    units = results["units"] or "none, bf16 emulated"
    print(f"CPU dtypes ({results['threads']} threads; bf16 units: {units}); "
          f"matmul peak float32 {results['peak_gflops']['float32']:,.1f} GFLOP/s, "
          f"bf16 {results['peak_gflops']['bf16']:,.1f} GFLOP/s")
    for case, figures in results["steps"].items():
        base = figures["float32"]["ms"]
        print(f"  train step, {case}: " + "; ".join(
            f"{label} {f['ms']:,.0f} ms ({base / f['ms']:.2f}x, MFU {f['mfu']:.1%}"
            + (f", compiled in {f['first_call_s']:.0f} s" if "compiled" in label else "") + ")"
            for label, f in figures.items()))
    for batch, figures in results["decode"].items():
        print(f"  greedy decoding, batch {batch}: float32 {figures['float32']:,.0f} tokens/s, bf16 "
              f"{figures['bf16']:,.0f} tokens/s ({figures['bf16'] / figures['float32']:.2f}x)")


def run(args):
    """The CPU-dtype race (--cpu_dtype); prints the report (or the JSON) and returns the results."""
    from transformers import AutoTokenizer
    device = torch.device("cpu")
    use_threads(device, args.threads)
    vocab_size = len(AutoTokenizer.from_pretrained(args.tokenizer_path))
    results = {"machine": machine(device), **bench_cpu_dtype(args, vocab_size, stderr_log())}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(machine_summary(results["machine"]))
        print_cpu_dtype(results)
    return results
