"""CUDA-only checks (skipped on CPU): bf16 and fp16 + GradScaler training, fused AdamW, --dtype auto on
the real GPU, generation on the GPU. (test_model.py generates under CUDA autocast too.)

Run on a GPU machine by bench_gpu.sh; CI has no GPU, so these are skipped there. The same mixed-precision
code paths run on CPU in CI through CPU autocast: test_mixed_precision.py.
"""
import pytest
import torch

from conftest import TINY_MODEL_ARGS, run_main, tiny_config
from model import Transformer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_bf16_autocast_loss_is_close_to_float32(tokenizer):
    torch.manual_seed(0)
    model = Transformer(tiny_config(len(tokenizer))).cuda()
    ids = torch.randint(0, len(tokenizer), (4, 64), device="cuda")
    full = model(ids, labels=ids).loss
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half = model(ids, labels=ids).loss
    assert half.dtype == torch.float32  # the loss is computed in float32 even under autocast
    assert abs(full.item() - half.item()) < 2e-2


def test_greedy_generation_on_gpu_equals_cpu(tokenizer):
    torch.manual_seed(0)
    model = Transformer(tiny_config(len(tokenizer)))
    prompt = torch.randint(0, len(tokenizer), (1, 8))
    on_cpu = model.generate(prompt, 20, temperature=0)
    on_gpu = model.cuda().generate(prompt.cuda(), 20, temperature=0).cpu()
    assert torch.equal(on_cpu, on_gpu)


def test_dtype_auto_is_native_bf16_from_ampere_on(tmp_path):
    from train_model import parse_args, resolve_device_and_dtype
    _, dtype = resolve_device_and_dtype(parse_args(["--device", "cuda", "--dtype", "auto"]))
    assert dtype == (torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_training_on_cuda_in_half_precision_writes_a_model(tmp_path, pretrain_file, capfd, dtype):
    args = [a if a != "cpu" else "cuda" for a in TINY_MODEL_ARGS]
    code = run_main(["--data_path", pretrain_file, "--out_dir", tmp_path / "out", *args, "--max_steps", "4",
                     "--batch_size", "4", "--log_interval", "2", "--eval_batches", "1", "--save_interval", "2",
                     "--dtype", dtype])
    assert code is None, code
    assert dtype in capfd.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").is_file()
    state = torch.load(tmp_path / "out" / "checkpoint-2" / "training_state.pt", weights_only=False)
    assert bool(state["scaler"]) == (dtype == "float16")  # GradScaler for float16 only
