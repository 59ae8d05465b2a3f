"""Recipes: the model shapes by size, and how each kind of run optimizes (optimizer, schedule, learning
rates). The one home of these numbers: train_model.py's defaults, train.sh, bench and the tests read them
here. How they were chosen is in docs/LOG.md; what they mean, in docs/training.md.

    python recipes.py demo-pretrain      the arguments of a run of RUNS, one line, for train.sh

The rule for --optimizer auto and --lr_schedule auto (choose_recipe): Muon + WSD to pretrain from scratch,
where it won on two model sizes; AdamW + cosine to fine-tune (--init_from: SFT, DPO, LoRA), where Muon
lost, and with --fsdp, which shards the matrices Muon must see whole. A resumed run keeps its
checkpoint's optimizer, whose state the checkpoint holds.
"""
import math
import sys
from dataclasses import dataclass

import torch

from errors import Fatal
from hardware import emulated

# Model shapes: train_model.py's own defaults are ModelConfig's (model.py), 26.7M parameters at vocab 6144.
SHAPES = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64),  # tests and smoke runs
    "demo": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, max_seq_len=256),  # train.sh on a CPU: 4.5M
    "demo-student": dict(dim=192, n_layers=3, n_heads=6, n_kv_heads=3, max_seq_len=256),  # half the demo: 2.4M
    "215m": dict(dim=1024, n_layers=18, n_heads=16, n_kv_heads=8, max_seq_len=512),  # the seed's GPU recipe
}

ADAMW_LEARNING_RATE = 3e-4  # --learning_rate's default: AdamW's peak (with Muon: the embedding's and norms')
MUON_LEARNING_RATE = 8e-3  # --muon_learning_rate's default for a new run

# Pretraining the demo: Muon at 8e-3 for the blocks' matrices, AdamW at 2.4e-2 for the embedding and norms
# (the winner of a sweep at 383 steps), WSD. The seed's recipe, AdamW + cosine, is the speedrun's baseline.
MUON_WSD = ["--optimizer", "muon", "--lr_schedule", "wsd", "--muon_learning_rate", "8e-3", "--learning_rate", "2.4e-2"]
DEMO_MUON = [*MUON_WSD, "--warmup_iters", "30"]
SEED_ADAMW = ["--optimizer", "adamw", "--lr_schedule", "cosine", "--learning_rate", "2e-3", "--warmup_iters", "30"]
SPEEDRUN_RECIPES = {"adamw-cosine": SEED_ADAMW, "muon-wsd": DEMO_MUON}


def shape_args(name):
    """A shape of SHAPES as train_model.py arguments."""
    return [arg for key, value in SHAPES[name].items() for arg in (f"--{key}", str(value))]


# train.sh's demo pretraining without its recipe: the model, batch and length the speedrun's recipes share.
DEMO_PRETRAIN = [*shape_args("demo"), "--batch_size", "16", "--max_steps", "383"]

# The demo's SFT without its length: the chat model's (demo-sft), and train.sh rl's second pass (demo-sft-forms).
DEMO_SFT = [*shape_args("demo"), "--batch_size", "16", "--learning_rate", "1e-3", "--warmup_iters", "20"]

# The runs of train.sh, as train_model.py arguments (data and directories are train.sh's).
RUNS = {
    "demo-pretrain": [*DEMO_PRETRAIN, *DEMO_MUON],
    "demo-sft": [*DEMO_SFT, "--max_steps", "400"],
    # train.sh rl's second pass of SFT, over the demo SFT's form requests alone (data/sft_poem_forms.jsonl.gz):
    # the 3,200 the demo's SFT read, in half its steps.
    "demo-sft-forms": [*DEMO_SFT, "--max_steps", "200"],
    "demo-dpo": ["--max_seq_len", "256", "--lora_rank", "16", "--lora_alpha", "32", "--batch_size", "8",
                 "--learning_rate", "2e-3", "--warmup_iters", "10", "--max_steps", "250"],
    # GRPO on form requests, of the chat model after demo-sft-forms (train.sh rl): rollouts at the
    # temperature answers are scored at (0.7), the rhyme weighed twice, a KL penalty that keeps greedy answers
    # from collapsing into repetition.
    "demo-grpo": ["--max_seq_len", "256", "--batch_size", "8", "--num_generations", "8", "--max_new_tokens", "100",
                  "--temperature", "0.7", "--reward", "poem_form,poem_rhyme", "--reward_weights", "1,2",
                  "--beta", "0.04", "--learning_rate", "6e-4", "--warmup_iters", "5", "--max_steps", "70",
                  "--eval_interval", "50", "--eval_batches", "2"],
    # A student of half the demo's size learns the base model's distributions with the demo's own pretraining
    # recipe and steps: half forward KL at temperature 1, half the data's cross-entropy, with which the
    # student passes its teacher (the divergence alone ends at the teacher: LOG.md).
    "demo-distill": [*shape_args("demo-student"), "--batch_size", "16", "--max_steps", "383", *DEMO_MUON,
                     "--distill_alpha", "0.5"],
    # train.sh tools' first step: the chat model reads data/copy_drills.jsonl.gz (poems' openings written two or
    # three times) with the pretraining optimizer, at the tool stage's 512 positions, and learns to copy what
    # its context holds (docs/tools.md); AdamW did not teach it in 400 steps.
    "demo-copy": ["--max_seq_len", "512", "--batch_size", "8", "--max_steps", "300", *MUON_WSD,
                  "--warmup_iters", "10"],
    # Tool conversations need 512 positions (446 tokens on average with the demo tokenizer).
    "demo-tools": ["--max_seq_len", "512", "--batch_size", "8", "--learning_rate", "1.5e-3", "--warmup_iters", "20",
                   "--max_steps", "400"],
    # AdamW + cosine: Muon's learning rates were measured on CPU-sized models only.
    "gpu-pretrain": [*shape_args("215m"), "--batch_size", "32", "--optimizer", "adamw", "--lr_schedule", "cosine",
                     "--learning_rate", "3e-4"],
    "gpu-sft": [*shape_args("215m"), "--batch_size", "32", "--learning_rate", "1e-4"],
}


@dataclass(frozen=True)
class Recipe:
    """How a run optimizes, with every `auto` resolved."""
    optimizer: str  # adamw or muon
    lr_schedule: str  # cosine or wsd
    muon_learning_rate: float


def choose_recipe(args, resume_dir=None, trained=None):
    """The Recipe of a run: its arguments' choices, `auto` resolved by the rule above. `trained`: the
    arguments saved in the checkpoint being resumed (from resume_dir), whose optimizer it keeps and whose
    schedule and Muon LR it keeps unless given. Checkpoints that predate these flags were AdamW + cosine's,
    and a Muon checkpoint without a Muon LR ran Muon at --learning_rate."""
    trained_optimizer = trained.get("optimizer", "adamw") if trained is not None else None
    if args.optimizer != "auto":
        optimizer = args.optimizer
    elif trained_optimizer is not None:
        optimizer = trained_optimizer
    else:
        optimizer = "muon" if args.init_from is None and not args.fsdp else "adamw"
    if trained_optimizer not in (None, optimizer):
        raise Fatal(f"{resume_dir} was trained with --optimizer {trained_optimizer}, whose state "
                    f"it holds; resume it with that optimizer, not {optimizer}")
    if optimizer == "muon" and args.fsdp:
        raise Fatal("--optimizer muon does not work with --fsdp: Muon orthogonalises each weight matrix whole, "
                    "and FSDP2 shards them over the ranks; drop --fsdp (DDP), or start a new run with "
                    "--optimizer adamw")
    if args.lr_schedule != "auto":
        schedule = args.lr_schedule
    elif trained is not None:
        schedule = trained.get("lr_schedule", "cosine")
    else:
        schedule = "wsd" if optimizer == "muon" else "cosine"
    if args.muon_learning_rate is not None:
        muon_learning_rate = args.muon_learning_rate
    elif trained_optimizer == "muon":
        muon_learning_rate = trained.get("muon_learning_rate") or trained["learning_rate"]
    else:
        muon_learning_rate = MUON_LEARNING_RATE
    return Recipe(optimizer, schedule, muon_learning_rate)


def recipe_summary(recipe, learning_rate):
    """The optimizer(s) and schedule in words, for the start-up line: 'Muon 0.008 + AdamW 0.0003, wsd'."""
    muon = f"Muon {recipe.muon_learning_rate:g} + " if recipe.optimizer == "muon" else ""
    return f"{muon}AdamW {learning_rate:g}, {recipe.lr_schedule}"


def get_lr(step, learning_rate, warmup_iters, max_steps, schedule="cosine", decay_fraction=0.2,
           decay_shape="1-sqrt"):
    """Linear warmup to learning_rate over warmup_iters steps, then
    cosine: down to a tenth of it at max_steps;
    wsd: learning_rate until the last decay_fraction of max_steps, then down to zero at max_steps, linearly
    or as 1 - sqrt(progress) (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed
    Training Durations"). The stable phase does not depend on max_steps, so a checkpoint taken in it can
    be continued with a larger max_steps and cooled down later."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / warmup_iters
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * max_steps))
        progress = min(1.0, max(0.0, (step - (max_steps - decay_steps)) / decay_steps))
        return learning_rate * (1 - (progress if decay_shape == "linear" else math.sqrt(progress)))
    min_lr = learning_rate / 10
    progress = min(1.0, (step - warmup_iters) / max(1, max_steps - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def newton_schulz(matrix, coefficients, steps, eps, dtype):
    """The orthogonalised update of Muon, as torch.optim.Muon computes it, in dtype: the quintic
    Newton-Schulz iteration that maps a matrix to about U V^T of its SVD U S V^T (Keller Jordan's Muon)."""
    a, b, c = coefficients
    x = matrix.to(dtype)
    tall = matrix.size(0) > matrix.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # the spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in ns_dtype. torch's always runs it in bf16, which a
    CPU without bf16 units emulates: there it is 17x slower than float32 (0.35 s against 0.02 s for one
    704 x 256 matrix on one core) and a demo step took 8 s instead of about 1.3; make_optimizers asks for
    float32 there. The state (each matrix's momentum buffer) is torch's, so checkpoints resume either way."""

    def __init__(self, params, ns_dtype=torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "this Muon takes no closure"
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            for param, grad, buffer in zip(params, grads, buffers):
                buffer.lerp_(grad, 1 - group["momentum"])
                update = grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       self.ns_dtype)
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update, alpha=-group["lr"] * rms_match(group["adjust_lr_fn"], param.shape))


def rms_match(adjust_lr_fn, shape):
    """The factor on Muon's LR for a matrix of this shape (torch's rule): "match_rms_adamw" scales the
    orthogonal update to the RMS of AdamW's (Moonshot's 0.2 sqrt(max(A, B))); "original" by sqrt(max(1, A/B))."""
    rows, columns = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, columns))
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1, rows / columns))
    return 1.0


def make_optimizers(model, args, recipe, device):
    """The optimizers of a step, as a list.

    adamw: one AdamW; weights of matmuls and embeddings decay, norms (1-D parameters) do not.
    muon: torch.optim.Muon for the 2-D weights inside the blocks (attention and MLP projections), AdamW for
    the embedding (tied to the output head) and the norms, which Muon's orthogonalised update does not
    suit. Muon's update is scaled to the RMS of AdamW's (adjust_lr_fn="match_rms_adamw", Moonshot's rule),
    and its peak is the recipe's Muon LR; its Newton-Schulz iteration runs in bf16 where the device has bf16
    units, in float32 where bf16 would be emulated (see Muon)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # LoRA: the adapters
    to_muon = {name for name, p in named if recipe.optimizer == "muon" and p.dim() == 2 and "layers." in name}
    decay = [p for name, p in named if name not in to_muon and p.dim() >= 2]
    no_decay = [p for name, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizers = [torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95), eps=1e-8,
                                    fused=device.type == "cuda")]
    if to_muon:
        ns_dtype = torch.float32 if emulated(device, torch.bfloat16) else torch.bfloat16
        optimizers.insert(0, Muon([p for name, p in named if name in to_muon], ns_dtype=ns_dtype,
                                  lr=recipe.muon_learning_rate, weight_decay=args.weight_decay,
                                  adjust_lr_fn="match_rms_adamw"))
    return optimizers


def set_learning_rates(optimizers, step, max_steps, args, recipe):
    """Each optimizer's LR at step, on the run's schedule (Muon's peak may differ from AdamW's); returns
    AdamW's, the one logged."""
    def at(peak):
        return get_lr(step, peak, args.warmup_iters, max_steps, recipe.lr_schedule, args.decay_fraction,
                      args.decay_shape)
    for optimizer in optimizers:
        lr = at(recipe.muon_learning_rate if isinstance(optimizer, torch.optim.Muon) else args.learning_rate)
        for group in optimizer.param_groups:
            group["lr"] = lr
    return at(args.learning_rate)


def main(argv=None):
    names = sys.argv[1:] if argv is None else argv
    unknown = [name for name in names if name not in RUNS and name not in SHAPES]
    if not names or unknown:
        sys.exit(f"usage: python recipes.py NAME...; NAME one of {', '.join([*RUNS, *SHAPES])}")
    print(" ".join(arg for name in names for arg in (RUNS[name] if name in RUNS else shape_args(name))))


if __name__ == "__main__":
    main()

