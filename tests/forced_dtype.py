"""Train on CPU in the mixed precision a CUDA run would choose: used by test_mixed_precision.py and,
under torchrun, by test_distributed.py. Usage: [torchrun ...] tests/forced_dtype.py DTYPE <train_model args>

train_model.py trains in float32 on CPU (no half-precision units there), so the bf16 and fp16 code paths
of a GPU run (autocast, GradScaler, FSDP2's bf16 parameters) would go untested without a GPU. CPU
autocast runs the same code paths; `force` makes train_model choose DTYPE as resolve_device_and_dtype
would on a GPU, and leaves everything else as it is.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_model  # noqa: E402


def force(dtype):
    """A resolve_device_and_dtype that keeps the device checks and returns dtype."""
    choose = train_model.resolve_device_and_dtype

    def forced(args):
        device, _ = choose(args)
        return device, dtype
    return forced


if __name__ == "__main__":
    train_model.resolve_device_and_dtype = force(getattr(torch, sys.argv[1]))
    train_model.main(sys.argv[2:])
