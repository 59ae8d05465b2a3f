"""Run train_model.main under torchrun with DistributedDataParallel instrumented; used by
test_distributed.py. Usage: torchrun ... tests/ddp_probe.py OUT_DIR <train_model arguments>

Before train_model builds its model, torch.nn.parallel.DistributedDataParallel is replaced by a subclass
that records, in order: each no_sync() entry, each forward (with the gradient-sync flag DDP reads then),
each backward (start and end, through torch.Tensor.backward) and each call of its communication hook (the
bucket all-reduce). The first call of clip_grad_norm_, i.e. after the first step's backward passes and
before clipping and the optimizer step, snapshots the gradients. Each rank saves OUT_DIR/rank<R>.pt.
Rank 0 also saves OUT_DIR/reference.pt: the gradient of the first step's whole batch (all ranks, all
micro-batches) computed in one single-process forward/backward with the loss averaged over its tokens.
"""
import contextlib
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.parallel
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_model  # noqa: E402
from dataset import PretrainDataset, SFTDataset, collate  # noqa: E402

events = []
grads = {}
wrapped = []


class ProbeDDP(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        wrapped.append(self)
        self.register_comm_hook(None, self._counting_hook)

    @staticmethod
    def _counting_hook(state, bucket):
        events.append(("allreduce", len(bucket.parameters())))
        return default_hooks.allreduce_hook(state, bucket)

    @contextlib.contextmanager
    def no_sync(self):
        events.append(("no_sync", None))
        with super().no_sync():
            yield

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():  # evaluation forwards (no_grad) are not part of a step
            events.append(("forward", bool(self.require_backward_grad_sync)))
        return super().forward(*args, **kwargs)


original_backward = torch.Tensor.backward


def recording_backward(self, *args, **kwargs):
    events.append(("backward_start", None))
    try:
        return original_backward(self, *args, **kwargs)
    finally:
        events.append(("backward_end", None))


original_clip = torch.nn.utils.clip_grad_norm_


def snapshotting_clip(parameters, *args, **kwargs):
    parameters = list(parameters)
    if not grads:
        module = wrapped[0].module
        grads.update({name: p.grad.detach().clone() for name, p in module.named_parameters()})
    events.append(("step", None))
    return original_clip(parameters, *args, **kwargs)


def reference_gradient(argv):
    """One process, one forward/backward over the first step's samples, loss = mean over their tokens."""
    from transformers import AutoTokenizer
    args = train_model.parse_args(argv)
    world_size = int(os.environ["WORLD_SIZE"])
    step_samples = args.batch_size * world_size * args.accumulation_steps
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
    torch.manual_seed(args.seed)
    model = train_model.build_model(args, tokenizer, None)
    # batch_size * world_size per global micro-batch, as in the run, so SFT's sorting windows agree.
    single = train_model.parse_args([*argv, "--batch_size", str(args.batch_size * world_size)])
    dataset_class = SFTDataset if train_model.training_mode(single) == "sft" else PretrainDataset
    dataset = dataset_class(single.data_path, tokenizer, single.max_seq_len, batch_size=single.batch_size,
                            seed=single.seed)
    samples = [s for s, _ in zip(dataset, range(step_samples))]
    batch = collate(samples, pad_id=tokenizer.pad_token_id)
    model(batch["input_ids"], labels=batch["labels"]).loss.backward()
    reference = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    # The same samples with the loss averaged per micro-batch of each rank, then over micro-batches and
    # ranks: what token weighting must avoid. The test checks it is distinguishable from the reference.
    model.zero_grad()
    micro = args.batch_size * world_size
    for start in range(0, step_samples, micro):
        for rank in range(world_size):
            part = collate(samples[start:start + micro][rank::world_size], pad_id=tokenizer.pad_token_id)
            loss = model(part["input_ids"], labels=part["labels"]).loss
            (loss / (world_size * args.accumulation_steps)).backward()
    per_micro_batch_mean = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return {"reference": reference, "per_micro_batch_mean": per_micro_batch_mean,
            "tokens": int((batch["labels"][:, 1:] != -100).sum())}


def main():
    out, argv = sys.argv[1], sys.argv[2:]
    torch.nn.parallel.DistributedDataParallel = ProbeDDP
    torch.Tensor.backward = recording_backward
    torch.nn.utils.clip_grad_norm_ = snapshotting_clip
    rank = int(os.environ["RANK"])
    try:
        train_model.main(argv)
    finally:
        torch.Tensor.backward = original_backward
        torch.save({"events": events, "grads": grads, "wrapped": len(wrapped)},
                   os.path.join(out, f"rank{rank}.pt"))
    assert not dist.is_initialized()
    if rank == 0:
        torch.save(reference_gradient(argv), os.path.join(out, "reference.pt"))


if __name__ == "__main__":
    main()
