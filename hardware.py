"""The dtype a job runs in, chosen from what the hardware does fast.

GPUs: bf16 where it is native (Ampere and later), float16 with loss scaling before (T4, V100), which
emulate bf16 slowly. CPUs: bf16 autocast where the CPU has bf16 matrix units (Intel AMX since Sapphire
Rapids, AVX512-BF16 on Intel since Cooper Lake and AMD since Zen 4), whose oneDNN kernels torch uses under
torch.autocast("cpu", dtype=torch.bfloat16); float32 elsewhere, where bf16 is emulated and several
times slower. Decoding one token at a time is a job of its own, with small matmuls that casts and
dispatch dominate: until bench.py --cpu_dtype has shown bf16 decoding faster on a CPU with the units,
generation and serving stay in float32 on CPU unless asked (docs/training.md, dtypes).

Every choice can be overridden: an explicit --dtype is honoured, with a warning where the hardware would
emulate it.
"""
import contextlib
import sys

import torch


def cpu_bf16_units():
    """The CPU's bf16 matrix units as torch sees them ("AMX", "AVX512-BF16"), or None."""
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return None


def cpu_fp16_units():
    """The CPU's float16 matrix units (AMX-FP16, Granite Rapids and later), or None."""
    return "AMX-FP16" if getattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)() else None


def choose_dtype(device, requested, job="train"):
    """(dtype, why) for a job ("train" or "decode") on device, `requested` being a --dtype value ("auto",
    "float32", "bfloat16", "float16"); `why` says in a few words what was chosen and why. The capability
    checks are the functions above, looked up at each call (tests replace them)."""
    if requested != "auto":
        dtype = getattr(torch, requested)
        by = emulated(device, dtype)
        return dtype, f"--dtype {requested}" + (f", emulated by this {by}: slow" if by else "")
    if device.type == "cuda":
        # Native bf16 only. By default torch also counts bf16 that pre-Ampere GPUs (T4, V100) emulate.
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16, "auto: the GPU has bf16 units"
        return torch.float16, "auto: the GPU has no bf16 units; float16 with loss scaling"
    units = cpu_bf16_units()
    if units is None:
        return torch.float32, "auto: the CPU has no bf16 units"
    if job == "decode":
        return torch.float32, f"auto: decoding stays float32 on CPU, even with {units} (docs/training.md)"
    return torch.bfloat16, f"auto: the CPU has {units} bf16 units"


def emulated(device, dtype):
    """What emulates dtype ("CPU", "GPU"), or None where the hardware runs it natively."""
    if dtype == torch.float32:
        return None
    if device.type == "cuda":
        native = dtype == torch.float16 or torch.cuda.is_bf16_supported(including_emulation=False)
        return None if native else "GPU"
    native = cpu_bf16_units() is not None if dtype == torch.bfloat16 else cpu_fp16_units() is not None
    return None if native else "CPU"


def warn_if_emulated(device, dtype):
    by = emulated(device, dtype)
    if by:
        print(f"warning: {str(dtype).removeprefix('torch.')} on this {by} is emulated, several times slower than "
              "float32", file=sys.stderr)


def autocast(device, dtype):
    """Mixed precision in dtype on device (weights stay float32); nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def add_dtype_argument(parser, job):
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help=f"{job} under autocast in this dtype (the weights stay float32); auto: "
                             "bfloat16 on GPUs with bf16 units (float16 on older ones), float32 on CPU "
                             "(docs/training.md, dtypes)")
