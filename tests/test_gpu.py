"""CUDA-only checks (skipped on CPU): bf16 autocast training, fused AdamW, generation on the GPU.

Run on a GPU machine by bench_gpu.sh; CI has no GPU, so these are skipped there.
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


def test_training_on_cuda_in_bf16_writes_a_model(tmp_path, pretrain_file, capfd):
    args = [a if a != "cpu" else "cuda" for a in TINY_MODEL_ARGS]
    code = run_main(["--data_path", pretrain_file, "--out_dir", tmp_path / "out", *args, "--max_steps", "4",
                     "--batch_size", "4", "--log_interval", "2", "--eval_batches", "1", "--save_interval", "0"])
    assert code is None, code
    assert "bfloat16" in capfd.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").is_file()
