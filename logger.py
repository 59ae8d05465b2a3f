"""The training run's log: metrics.jsonl (every --log_interval steps and every evaluation), SwanLab, the
progress bar and the console; and the throughput and MFU of the steps.

MFU (model FLOPs utilisation) is the model's FLOPs per second over the matmul FLOP/s this device actually
reaches (measured at start-up, in the run's dtype), not over a datasheet's peak: it says how much of the
reachable speed the step uses, on any machine.
"""
import json
import os
import time

import torch
from tqdm import tqdm


class Logger:
    """metrics.jsonl, SwanLab, the progress bar and the console; only rank 0 writes anything. Throughput
    is measured over the steps since the last log line, training time only (evaluations and saves excluded)."""

    def __init__(self, run, start_step, max_steps, model, mode):
        self.run, self.is_main, self.swanlab = run, run.is_main, None
        self.max_steps, self.mode = max_steps, mode
        self.flops_per_token = model.flops_per_token(run.args.max_seq_len)
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.peak_flops = measure_matmul_flops(run.device, run.dtype)
        self.interval_seconds, self.interval_tokens, self.interval_positions = 0.0, 0, 0
        self.path = os.path.join(run.args.out_dir, "metrics.jsonl")
        if not self.is_main:
            return
        os.makedirs(run.args.out_dir, exist_ok=True)
        kept = []
        if start_step > 0 and os.path.exists(self.path):
            # A resumed run continues the file; entries past the checkpoint are redone, so they go.
            with open(self.path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= start_step]
        with open(self.path, "w") as f:
            f.writelines(kept)
        if run.args.use_swanlab:
            import swanlab
            self.swanlab = swanlab.init(project=run.args.swanlab_project, mode=run.args.swanlab_mode,
                                        config=vars(run.args), log_dir=os.path.join(run.args.out_dir, "swanlog"))
        self.bar = tqdm(total=max_steps, initial=start_step, desc=run.mode, dynamic_ncols=True, disable=None)

    def step_done(self, progress, result, seconds):
        """Count a step's time and tokens; every --log_interval steps (and at the last), log them."""
        world_size = self.run.world_size
        self.interval_seconds += seconds
        trained = result.loss is not None  # else a step with nothing to learn from, skipped
        step_metrics = self.mode.step_metrics(result.stats, result.items, seconds) if trained else {}
        self.interval_tokens += result.tokens
        self.interval_positions += result.positions
        if self.is_main:
            self.bar.update(1)
        if progress.step % self.run.args.log_interval and progress.step != self.max_steps:
            return
        tokens_per_sec = self.interval_tokens / self.interval_seconds
        # MFU counts every position the model ran (padding too): it measures the hardware, not the data.
        mfu = self.flops_per_token * self.interval_positions / self.interval_seconds / world_size / self.peak_flops
        record = {"step": progress.step}
        if result.loss is not None:  # None: a step with nothing to learn from, skipped
            record.update(loss=round(result.loss, 6), lr=result.lr)
        record.update(tokens=progress.tokens_seen, trainable_params=self.trainable)
        record.update(step_metrics)
        record.update(elapsed_s=round(progress.elapsed(), 1), tokens_per_sec=round(tokens_per_sec, 1),
                      tokens_per_sec_per_device=round(tokens_per_sec / world_size, 1), mfu=round(mfu, 4))
        if result.loss is not None:
            record["grad_norm"] = round(result.grad_norm, 4)
        self.log(record)
        if self.is_main and result.loss is not None:
            self.bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{result.lr:.2e}", tok_s=f"{tokens_per_sec:.0f}",
                                 mfu=f"{mfu:.1%}")
        self.interval_seconds, self.interval_tokens, self.interval_positions = 0.0, 0, 0

    def log(self, record):
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.swanlab is not None:
            self.swanlab.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def write(self, message):
        if self.is_main:
            tqdm.write(message)

    def close(self):
        if self.is_main:
            self.bar.close()
            if self.swanlab is not None:
                self.swanlab.finish()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_flops(device, dtype, seconds=0.5):
    """This device's achieved matmul FLOP/s, the denominator of MFU (bench measures it the same way).

    A GPU needs large matmuls to reach its peak (a 1024^3 one takes microseconds on an H200, less than
    launching and waiting for it), and queues them asynchronously: the matmuls run in batches that
    double in size, with one synchronize per batch, so the wait for the GPU is a small part of the time."""
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection, allocations
    synchronize(device)
    runs, batch, start = 0, 1, time.perf_counter()
    while True:
        for _ in range(batch):
            a @ b
        synchronize(device)
        runs += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * size ** 3 * runs / elapsed
        batch *= 2
