"""Pretrain, fine-tune (SFT) or align (DPO) a Tiny-LLM model, fully or with LoRA adapters, on one CPU or
GPU or, under torchrun, on many.

    python train_model.py --data_path data/pretrain_poetry.jsonl.gz --out_dir base_model
    python train_model.py --data_path data/sft_poetry.jsonl.gz --init_from base_model --out_dir sft_model
    python train_model.py --mode dpo --data_path data/dpo_poetry.jsonl.gz --init_from sft_model \
        --lora_rank 16 --out_dir dpo_model
    torchrun --nproc_per_node 8 train_model.py ...   (DDP; add --fsdp to shard the model)
    python train_model.py --data_path corpus/ --token_cache corpus.bin --num_workers 4 ...
                                                      (shards: .jsonl, .jsonl.gz, .parquet; globs work too)

One loop, train(), for every mode: a mode (modes.py) supplies the micro-batches of a step, the loss of
each and the held-out metrics; the loop does the rest: accumulation, the update, the schedule, logging,
evaluation, checkpoints (checkpoints.py), stop signals. The optimizer and schedule come from recipes.py,
LoRA from lora.py.

A step is one optimizer step: batch_size x accumulation_steps x world_size samples. The run ends after
--max_steps or when --epochs passes over the data are done. out_dir becomes a Hugging Face model
directory; out_dir/metrics.jsonl logs every --log_interval steps and every evaluation.
"""
import argparse
import contextlib
import gc
import math
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from checkpoints import (checkpoint_to_resume, load_optimizer_state, model_weights, remove_debris, resume_command,
                         save_atomically, save_checkpoint, save_final_model, write_model_dir)
from corpus import DataError, data_files
from errors import Fatal, Stopped
from hardware import autocast, choose_dtype, warn_if_emulated
from logger import Logger
from lora import ADAPTER_DIR, LORA_TARGETS, add_lora, load_adapter, lora_target_names, write_adapter_dir
from model import ModelConfig, Transformer
import rollout
from distill import Distill
from grpo import GRPO
from modes import DPO, LanguageModel, all_reduce_sum
from recipes import (ADAMW_LEARNING_RATE, MUON_LEARNING_RATE, Recipe, choose_recipe, make_optimizers,
                     recipe_summary, set_learning_rates)


MODES = {"pretrain": LanguageModel, "sft": LanguageModel, "dpo": DPO, "grpo": GRPO, "distill": Distill}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    add_optimization_arguments(p)
    add_model_arguments(p)
    add_logging_arguments(p)
    for mode_class in dict.fromkeys(MODES.values()):  # each mode's own options, once
        mode_class.add_arguments(p)
    rollout.add_arguments(p)
    return p.parse_args(argv)


def add_run_arguments(p):
    p.add_argument("--out_dir", default="out", help="where the model, checkpoints and metrics go")
    p.add_argument("--data_path", nargs="+", default=["data/pretrain_poetry.jsonl.gz"],
                   help="files (.jsonl, .jsonl.gz, .parquet), directories of them or glob patterns; "
                        "read in sorted path order as one corpus")
    p.add_argument("--val_data_path", nargs="+", default=None,
                   help="validate on every record of these files (same forms) instead of every 200th of --data_path")
    p.add_argument("--tokenizer_path", default="custom_tokenizer")
    p.add_argument("--mode", choices=["auto", *MODES], default="auto",
                   help="auto: sft when a --data_path name contains 'sft', dpo when it contains 'dpo', else "
                        "pretrain. dpo: preference pairs against the frozen --init_from model; grpo: RL with "
                        "verifiable rewards (grpo.py); distill: a student learns a --teacher's distributions")
    p.add_argument("--init_from", default=None, help="model directory to start from (SFT on a base model)")
    p.add_argument("--resume", default=None, help="checkpoint directory, or 'auto' for the newest in out_dir")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=None,
                   help="optimizer steps; sets the LR schedule's length (default: one pass per epoch, counted "
                        "exactly with --token_cache, else estimated from the first lines)")
    p.add_argument("--batch_size", type=int, default=8, help="samples per micro-batch on each process")
    p.add_argument("--accumulation_steps", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="mixed precision (autocast; weights and checkpoints stay float32). auto: bfloat16 where "
                        "the GPU or CPU has bf16 units (GPUs without: float16 with loss scaling), else float32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fsdp", action="store_true", help="under torchrun, shard the model with FSDP2")
    p.add_argument("--seed", type=int, default=1337,
                   help="the model's initialisation, dropout, and the order in which the data is shuffled")
    p.add_argument("--num_workers", type=int, default=0,
                   help="DataLoader worker processes; also the processes that build --token_cache (at least 1)")
    p.add_argument("--token_cache", default=None, metavar="PATH",
                   help="pretraining: tokenize the data once into PATH (memmap) and read it from there; "
                        "for several epochs or many GPUs. An interrupted build continues on the next run")
    p.add_argument("--strict", action="store_true", help="stop at the first bad input line")
    p.add_argument("--max_bad_fraction", type=float, default=0.01, help="stop if more lines are bad")
    p.add_argument("--max_bad_steps", type=int, default=10,
                   help="stop after this many optimizer steps in a row with a non-finite loss or gradient")


def add_optimization_arguments(p):
    p.add_argument("--learning_rate", type=float, default=ADAMW_LEARNING_RATE,
                   help="peak LR of AdamW (with Muon: of the embedding and the norms)")
    p.add_argument("--warmup_iters", type=int, default=100)
    p.add_argument("--lr_schedule", default="auto", choices=["auto", "cosine", "wsd"],
                   help="auto: wsd with Muon, cosine with AdamW. After warmup: cosine down to a tenth of the "
                        "peak at the last step, or wsd "
                        "(warmup-stable-decay): the peak until the last --decay_fraction of the steps, then "
                        "a cool-down to zero; a wsd run resumed with a larger --max_steps cools down again")
    p.add_argument("--decay_fraction", type=float, default=0.2, help="wsd: share of the steps that cool down")
    p.add_argument("--decay_shape", default="1-sqrt", choices=["linear", "1-sqrt"],
                   help="wsd: the cool-down's shape; 1-sqrt keeps the LR higher for longer")
    p.add_argument("--optimizer", default="auto", choices=["auto", "adamw", "muon"],
                   help="muon: torch.optim.Muon for the weight matrices of the blocks, AdamW for the rest; "
                        "auto: muon to pretrain from scratch, adamw to fine-tune (--init_from) or with --fsdp")
    p.add_argument("--muon_learning_rate", type=float, default=None,
                   help=f"Muon's peak LR (its update is scaled to AdamW's RMS); default {MUON_LEARNING_RATE:g}, "
                        "or a resumed run's")
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm; 0 disables clipping")
    p.add_argument("--lora_rank", type=int, default=0,
                   help="train LoRA adapters of this rank (PEFT) on the frozen --init_from model; 0: off")
    p.add_argument("--lora_alpha", type=float, default=16.0, help="LoRA's scale is lora_alpha / lora_rank")
    p.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the adapters' input")
    p.add_argument("--lora_targets", default=",".join(LORA_TARGETS),
                   help="comma-separated modules that get adapters, by our names (wq,wk,wv,wo: attention; "
                        "w1,w2,w3: MLP) or Hugging Face's (q_proj, ..., gate_proj, down_proj, up_proj)")


def add_model_arguments(p):
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
        p.add_argument(f"--{name}", type=int, default=getattr(ModelConfig, name))
    p.add_argument("--dropout", type=float, default=ModelConfig.dropout)


def add_logging_arguments(p):
    p.add_argument("--log_interval", type=int, default=10)
    p.add_argument("--eval_interval", type=int, default=200)
    p.add_argument("--eval_batches", type=int, default=20, help="validation batches per evaluation")
    p.add_argument("--eval_tasks", default=None, metavar="TASKS",
                   help="comma-separated lm-eval tasks (e.g. tiny_llm_poetry, see eval.py) scored at each "
                        "evaluation and logged to metrics.jsonl; off by default")
    p.add_argument("--save_interval", type=int, default=1000, help="checkpoint every N steps; 0: never")
    p.add_argument("--save_total_limit", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--use_swanlab", action="store_true", help="log to SwanLab")
    p.add_argument("--swanlab_mode", default="local", choices=["local", "offline", "online", "disabled"],
                   help="online needs `swanlab login`; local and offline never ask for anything")
    p.add_argument("--swanlab_project", default="Tiny-LLM")


def check_arguments(args, mode):
    for name in ("batch_size", "accumulation_steps", "epochs", "max_seq_len", "log_interval",
                 "eval_interval", "eval_batches", "save_total_limit"):
        if getattr(args, name) <= 0:
            raise Fatal(f"--{name} must be positive, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps <= 0:
        raise Fatal(f"--max_steps must be positive, got {args.max_steps}")
    if not 0 < args.decay_fraction <= 1:
        raise Fatal(f"--decay_fraction must be in (0, 1], got {args.decay_fraction}")
    MODES[mode].check_arguments(args)
    if args.lora_rank < 0:
        raise Fatal(f"--lora_rank must be 0 (off) or positive, got {args.lora_rank}")
    if args.lora_rank:
        if args.init_from is None:
            raise Fatal("--lora_rank needs --init_from: LoRA adapts a trained model, whose weights stay frozen")
        if args.fsdp:
            raise Fatal("--lora_rank does not work with --fsdp (not supported: the frozen base has no optimizer "
                        "state to shard); drop --fsdp, DDP trains LoRA")
        lora_target_names(args.lora_targets)  # unknown names stop here
    for paths in (args.data_path, args.val_data_path):
        try:
            if paths is not None:
                data_files(paths)
        except DataError as e:
            raise Fatal(str(e))
    if not os.path.isfile(os.path.join(args.tokenizer_path, "tokenizer.json")):
        raise Fatal(f"no tokenizer in {args.tokenizer_path}; train one with `python tokenizer.py` "
                    "or pass --tokenizer_path")
    if args.eval_tasks:
        from eval import EvalError, task_manager_for
        try:
            task_manager_for(args.eval_tasks.split(","))  # unknown names stop the run now, not at step N
        except EvalError as e:
            raise Fatal(f"--eval_tasks: {e}")


def training_mode(args):
    if args.mode != "auto":
        return args.mode
    names = [os.path.basename(os.path.normpath(path)).lower() for path in args.data_path]
    return "dpo" if any("dpo" in name for name in names) else "sft" if any("sft" in name for name in names) \
        else "pretrain"


# --- set-up ----------------------------------------------------------------------------------------

@dataclass
class Run:
    """What every part of a run reads: its arguments, its mode and recipe, where it runs, and the
    checkpoint it resumes (`state`: the training state saved there, or None)."""
    args: argparse.Namespace
    mode: str
    recipe: Recipe
    device: torch.device
    dtype: torch.dtype
    dtype_why: str  # how --dtype was resolved, for the start-up line
    rank: int
    world_size: int
    tokenizer: object
    resume_dir: str | None
    state: dict | None
    autocast: object = None  # mixed precision: one torch.autocast to the run's dtype (nothing in float32)

    def __post_init__(self):
        self.autocast = autocast(self.device, self.dtype)

    @property
    def is_main(self):
        return self.rank == 0


def start_run(args):
    """Check the arguments, find the device, the processes and the checkpoint to resume, choose the recipe."""
    mode = training_mode(args)
    check_arguments(args, mode)
    device, dtype, dtype_why = resolve_device_and_dtype(args)
    rank, world_size, device = setup_distributed(device)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)  # the datasets check its chat template
    resume_dir, state = checkpoint_to_resume(args.resume, args.out_dir, announce=rank == 0)
    recipe = choose_recipe(args, resume_dir, state["args"] if state is not None else None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Run(args, mode, recipe, device, dtype, dtype_why, rank, world_size, tokenizer, resume_dir, state)


def setup_distributed(device):
    """(rank, world_size, device): torchrun sets RANK; each rank gets its own GPU, gloo serves CPUs."""
    if "RANK" not in os.environ:
        return 0, 1, device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def resolve_device_and_dtype(args):
    """(device, dtype, why): the device asked for, checked, and the dtype hardware.choose_dtype picks
    for training there, with the reason in words for the start-up line."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise Fatal(f"unknown --device {args.device!r}; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Fatal(f"--device {args.device} asked for, but no CUDA GPU is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise Fatal(f"--device {args.device}: only cpu and cuda are supported")
    dtype, why = choose_dtype(device, args.dtype)
    if os.environ.get("RANK", "0") == "0":
        warn_if_emulated(device, dtype)
    return device, dtype, why


def build_model(args, tokenizer, resume_dir):
    """A new model from the arguments, or the weights of --init_from or of the checkpoint to resume.
    With LoRA: --init_from's weights, with the adapters of the checkpoint to resume (if any)."""
    source = args.init_from if args.lora_rank else resume_dir or args.init_from
    if source is None:
        config = ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                             n_kv_heads=args.n_kv_heads, vocab_size=len(tokenizer),
                             max_seq_len=args.max_seq_len, dropout=args.dropout)
        return Transformer(config)
    if not os.path.isfile(os.path.join(source, "model.safetensors")):
        raise Fatal(f"{source} holds no model.safetensors; pass a directory written by train_model.py")
    try:
        model = Transformer.from_pretrained(source, strict=True, dropout=args.dropout)
        if args.max_seq_len > model.config.max_seq_len:
            # RoPE has no learnt positions: a longer context is a longer table of the same rotations, which
            # fine-tuning on longer sequences (tool conversations, say) teaches the model to use.
            print(f"{source} has {model.config.max_seq_len} positions; extending them to --max_seq_len "
                  f"{args.max_seq_len}", file=sys.stderr)
            model = Transformer.from_pretrained(source, strict=True, dropout=args.dropout,
                                                max_seq_len=args.max_seq_len)
    except (ValueError, RuntimeError) as e:
        raise Fatal(f"cannot load {source}: {' '.join(str(e).split())[:300]}")
    if model.config.vocab_size != len(tokenizer):
        raise Fatal(f"{source} has a vocabulary of {model.config.vocab_size} tokens but the tokenizer in "
                    f"{args.tokenizer_path} has {len(tokenizer)}; use the tokenizer the model was trained with")
    if args.lora_rank:
        model = add_lora(model, args)
        if resume_dir:
            load_adapter(model, resume_dir)
    return model


def build_models(run):
    """(model, parallel): the Transformer on the run's device (seeded: a new model's initial weights depend
    only on --seed), and the same model as the step runs it: itself on one process, DDP under torchrun,
    FSDP2 with --fsdp; compiled with --compile."""
    args = run.args
    torch.manual_seed(args.seed)
    model = build_model(args, run.tokenizer, run.resume_dir).to(run.device)
    if run.mode == "sft" and args.init_from is None and run.resume_dir is None and run.is_main:
        print("warning: SFT on a randomly initialised model; pass --init_from a pretrained model", file=sys.stderr)
    parallel = model
    if run.world_size > 1 and args.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=run.dtype, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mp_policy=policy)
        parallel = fully_shard(model, mp_policy=policy)
    elif run.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel
        parallel = DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if args.compile:
        parallel.compile()  # in place: the module, its state dict and DDP's gradient sync stay as they are
    return model, parallel


class Optimization:
    """The optimizers, the loss scaler and the learning-rate schedule: one update from a step's gradients."""

    def __init__(self, run, parallel, max_steps):
        self.run, self.parallel, self.max_steps = run, parallel, max_steps
        self.optimizers = make_optimizers(parallel, run.args, run.recipe, run.device)
        # Loss scaling exists for float16's narrow range; bfloat16 has float32's range and needs none.
        self.scaler = make_grad_scaler(run.device, run.dtype)
        self.bad_steps_in_row = 0
        if run.state is not None:
            load_optimizer_state(parallel, self.optimizers, run.state["optimizer"])
            if run.state.get("scaler"):
                self.scaler.load_state_dict(run.state["scaler"])

    def set_learning_rates(self, step):
        return set_learning_rates(self.optimizers, step, self.max_steps, self.run.args, self.run.recipe)

    def backward(self, loss):
        self.scaler.scale(loss).backward()

    def update(self, step, step_loss, logger):
        """Clip and apply the gradients (the gradient norm before clipping); a step whose loss or gradient
        is not finite is skipped, and --max_bad_steps of them in a row stop the run."""
        args = self.run.args
        for optimizer in self.optimizers:
            self.scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.parallel.parameters(), args.grad_clip or float("inf")))
        # With float16 the scaler skips a step with inf gradients by itself, and lowers its scale.
        finite = math.isfinite(step_loss) and (self.scaler.is_enabled() or math.isfinite(grad_norm))
        if finite:
            for optimizer in self.optimizers:
                self.scaler.step(optimizer)
            self.bad_steps_in_row = 0
        else:
            self.bad_steps_in_row += 1
            logger.write(f"step {step + 1}: non-finite loss {step_loss} or gradient norm {grad_norm}; "
                         "skipped the update")
        self.scaler.update()  # after every unscale_, stepped or not: the next step's unscale_ needs it
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        if self.bad_steps_in_row >= args.max_bad_steps:
            raise Fatal(f"{self.bad_steps_in_row} steps in a row had a non-finite loss or gradient; stopping. "
                        "Lower --learning_rate, check the data, or resume from the last checkpoint")
        return grad_norm


def make_grad_scaler(device, dtype):
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


@dataclass
class Progress:
    """Where the run is: steps taken, samples and labelled tokens trained on, wall time (continued across
    resumes: report.py plots the losses against it). Checkpoints save it; a resumed run continues from it."""
    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0  # wall time of the runs this one resumes
    started: float = 0.0

    @classmethod
    def of(cls, state):
        if state is None:
            return cls(started=time.time())
        return cls(state["step"], state["samples_seen"], state["tokens_seen"], state.get("elapsed_s", 0.0),
                   time.time())

    def elapsed(self):
        return self.elapsed_before + time.time() - self.started


def schedule_length(run, mode):
    """(max_steps, exact): --max_steps; else a resumed run's own schedule; else --epochs passes over the
    data, counted exactly where that is cheap (the token cache) and estimated otherwise."""
    samples, exact = mode.samples_per_epoch()  # called in every case: it also checks the data
    args = run.args
    if args.max_steps:
        return args.max_steps, True
    if run.state is not None:
        return run.state["max_steps"], True
    if not exact:
        return max(1, math.ceil(samples * args.epochs / mode.samples_per_step)), False
    # Rank r holds every world_size-th sample from the r-th, in micro-batches (the last may be partial); a
    # step takes accumulation_steps of them on every rank, and ends the run where any rank has fewer.
    total, world_size = samples * args.epochs, run.world_size
    per_rank = [(total - rank + world_size - 1) // world_size for rank in range(world_size)]
    return min(math.ceil(n / args.batch_size) // args.accumulation_steps for n in per_rank), True


# --- the run ---------------------------------------------------------------------------------------

@dataclass
class Training:
    """Everything a run holds while it trains; train() and its named steps read and update it."""
    run: Run
    model: Transformer  # unwrapped: what generates, what checkpoints are written from
    parallel: torch.nn.Module  # the same model as the step runs it (see build_models)
    mode: object  # a modes.Mode
    optimization: Optimization
    progress: Progress
    max_steps: int
    exact_schedule: bool  # max_steps counted, not estimated
    logger: "Logger"
    val_loss: float | None = None
    validation: str = "no validation lines"  # the last evaluation, in words
    checkpoint: str | None = None  # the checkpoint written at the last step, if any


def train(args):
    t = set_up_training(args)
    args, mode, progress = t.run.args, t.mode, t.progress
    with stop_requests() as stop:
        if mode.evaluate_first and progress.step == 0:
            validate(t)  # where the model starts: the held-out figure the mode improves on (DPO)
        while not schedule_done(t):
            # Dropout masks and sampling depend only on (seed, step, rank): a resumed run draws the same.
            torch.manual_seed(args.seed + 1_000_003 * progress.step + t.run.rank)
            step_start = time.perf_counter()
            batches = mode.step_batches(progress.step)
            tokens, items, data_ended, stopping = agree_on_step(t, batches, stop)
            if stopping:
                stop_with_checkpoint(t, stop)
            if data_ended:
                break  # on some rank: the incomplete last step is dropped everywhere
            result = train_step(t, batches, tokens, items)
            progress.step += 1
            progress.samples_seen += mode.samples_drawn()
            progress.tokens_seen += tokens
            t.logger.step_done(progress, result, time.perf_counter() - step_start)
            if progress.step % args.eval_interval == 0:
                validate(t)
            t.checkpoint = save(t) if args.save_interval and progress.step % args.save_interval == 0 else None
    if progress.step < t.max_steps and not t.exact_schedule:
        t.logger.write(f"warning: the data ended at step {progress.step}, before the end of the schedule "
                       f"({t.max_steps} steps, estimated from the first lines): the learning rate had not "
                       "finished its decay. Pass --max_steps, or --token_cache for an exact count")
    return finish(t)


def set_up_training(args):
    """The run, its model, mode, optimizers and logger, resumed from a checkpoint if asked."""
    run = start_run(args)
    model, parallel = build_models(run)
    start = {"start_sample": run.state["samples_seen"]} if run.state is not None else {}
    mode = MODES[run.mode](run, model, **start)
    if run.state is not None:
        mode.load_state_dict(run.state.get("mode", {}))
    max_steps, exact = schedule_length(run, mode)
    optimization = Optimization(run, parallel, max_steps)
    progress = Progress.of(run.state)
    if run.is_main:
        remove_debris(args.out_dir)
    logger = Logger(run, progress.step, max_steps, model, mode)
    logger.write(start_up_line(run, model, mode, max_steps, progress.step))
    return Training(run, model, parallel, mode, optimization, progress, max_steps, exact, logger)


def start_up_line(run, model, mode, max_steps, start_step):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"{run.mode}: {model.num_params() / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trained "
            f"({trainable / model.num_params():.1%}), {run.world_size} process(es) on {run.device.type}, "
            f"{run.dtype} ({run.dtype_why}), {mode.samples_per_step} samples x {run.args.max_seq_len} tokens per "
            f"step, {max_steps} steps, {recipe_summary(run.recipe, run.args.learning_rate)}"
            + (f", resumed at step {start_step}" if start_step else ""))


def schedule_done(t):
    """Whether the run stops before its next step: at --max_steps; or, without it, past the end of the
    schedule under WSD, whose learning rate is 0 there (cosine goes on at its floor until the data ends)."""
    if t.progress.step < t.max_steps:
        return False
    if t.run.args.max_steps is not None or t.exact_schedule and t.run.state is None:
        return True
    if t.progress.step == t.max_steps:
        what = "stopping: WSD's learning rate is 0 from here" if t.run.recipe.lr_schedule == "wsd" else \
            "going on at the schedule's floor learning rate until the data ends"
        t.logger.write(f"warning: the data outlasts the schedule's {t.max_steps} steps; {what}. "
                       "Pass --max_steps, or --token_cache for an exact count")
    return t.run.recipe.lr_schedule == "wsd"


@contextlib.contextmanager
def stop_requests():
    """Ctrl-C and SIGTERM ask the run to stop after the current step (the signals received: a list)."""
    received = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    yield received


def agree_on_step(t, batches, stop):
    """(labelled tokens, items, data ended, stopping) of the step, agreed by every rank in one collective:
    the counts of the step, whether any rank ran out of data, and whether any rank was asked to stop
    (signals reach ranks at different moments)."""
    counts = [t.mode.count(batch) for batch in batches]
    tokens, items, short, stopping = all_reduce_sum(
        [sum(c[0] for c in counts), sum(c[1] for c in counts), len(batches) < t.run.args.accumulation_steps,
         bool(stop)], t.run.device, t.run.world_size)
    return int(tokens), items, bool(short), bool(stopping)


@dataclass
class StepResult:
    """What a step did, for the log."""
    lr: float
    tokens: int  # labelled tokens, all ranks
    items: float  # what the loss averages over, all ranks
    positions: int  # positions the model ran, padding included, all ranks
    loss: float | None = None  # None: the step had nothing to learn from and was skipped
    stats: list = field(default_factory=list)  # sums of the mode's stat_names
    grad_norm: float | None = None


def train_step(t, batches, tokens, items):
    """Forward and backward over the step's micro-batches, then one update at the scheduled learning rate.
    A step with no labelled tokens trains nothing."""
    run, mode = t.run, t.mode
    result = StepResult(t.optimization.set_learning_rates(t.progress.step), tokens, items,
                        sum(batch["input_ids"].numel() for batch in batches) * run.world_size)
    if tokens == 0:
        # Possible in SFT when truncation cut off every answer in the step: nothing to learn from.
        t.logger.write(f"step {t.progress.step + 1}: no labelled tokens (answers truncated away?); skipped")
        return result
    loss_sum = torch.zeros((), device=run.device)
    stat_sums = torch.zeros(len(mode.stat_names), device=run.device)
    for i, batch in enumerate(batches):
        batch = {name: tensor.to(run.device, non_blocking=True) for name, tensor in batch.items()}
        with gradient_sync(t, last=i == len(batches) - 1):
            with run.autocast:
                # DDP and FSDP average gradients over ranks, hence world_size / all items of the step.
                loss, stats = mode.loss(t.parallel, batch, items / run.world_size)
            t.optimization.backward(loss)
        loss_sum += loss.detach()
        if stats:
            stat_sums += torch.stack([v.float() for v in stats])
    step_loss, *result.stats = all_reduce_sum([loss_sum.item(), *stat_sums.tolist()], run.device, run.world_size)
    result.loss = step_loss / run.world_size
    result.grad_norm = t.optimization.update(t.progress.step, result.loss, t.logger)
    return result


def gradient_sync(t, last):
    """Gradients are averaged over ranks after the last micro-batch of a step only (set before its forward)."""
    if t.run.world_size == 1:
        return contextlib.nullcontext()
    if t.run.args.fsdp:
        t.parallel.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last else t.parallel.no_sync()


def validate(t):
    """The mode's held-out metrics (and --eval_tasks' scores), logged."""
    run = t.run
    metrics, message = t.mode.validate(t.parallel)
    record = {"step": t.progress.step, "tokens": t.progress.tokens_seen, "elapsed_s": round(t.progress.elapsed(), 1),
              **metrics}
    if run.args.eval_tasks:
        scores = task_scores(t)
        record.update(scores)
        message.append(", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    if message:
        t.logger.log(record)
        t.logger.write(f"step {t.progress.step}: " + ", ".join(message))
        t.validation = ", ".join(message)
    t.val_loss = record.get("val_loss", t.val_loss)


def task_scores(t):
    """--eval_tasks: {"task/metric": value} from lm-eval for the model as it is now. Rank 0 saves it to a
    temporary model directory and evaluates that with eval.py; the other ranks wait."""
    run = t.run
    state_dict = model_weights(t.parallel, t.model, run.args.lora_rank, run.world_size)
    scores = {}
    if run.is_main:
        import tempfile
        from eval import evaluate as evaluate_tasks, make_lm, scores as score_rows
        with tempfile.TemporaryDirectory() as tmp:
            write_model_dir(tmp, t.model, state_dict, run.tokenizer)
            results = evaluate_tasks(make_lm(tmp, str(run.device), run.args.batch_size), run.args.eval_tasks.split(","))
        scores = {f"{row['task']}/{row['metric']}": round(row["value"], 6) for row in score_rows(results)}
    if run.world_size > 1:
        dist.barrier()
    return scores


def training_state(t):
    """What a checkpoint holds besides the model and the optimizers' state."""
    progress, run = t.progress, t.run
    return {"step": progress.step, "max_steps": t.max_steps, "samples_seen": progress.samples_seen,
            "tokens_seen": progress.tokens_seen, "elapsed_s": progress.elapsed(),
            "scaler": t.optimization.scaler.state_dict(), "mode": t.mode.state_dict(),
            "args": {**vars(run.args), **asdict(run.recipe)}}  # the recipe as resolved, for a resume


def save(t):
    return save_checkpoint(t.run, t.progress.step, t.model, t.parallel, t.optimization.optimizers, training_state(t))


def stop_with_checkpoint(t, stop):
    """A stop signal: a checkpoint of the steps done (unless the last step wrote one), then Stopped."""
    path = t.checkpoint or save(t)
    t.logger.write(f"stopped by a signal after step {t.progress.step}; checkpoint in {path}.\n"
                   f"resume with: {resume_command(path)}")
    t.logger.close()
    # A rank stopped on another rank's behalf got no signal itself; it stops as if sent SIGTERM.
    raise Stopped(stop[0] if stop else signal.SIGTERM)


def finish(t):
    """A last evaluation unless the last step had one, then the final model in out_dir (LoRA: merged, and
    the adapter directory beside it)."""
    run, args, progress = t.run, t.run.args, t.progress
    if progress.step > (t.run.state or {}).get("step", 0) and progress.step % args.eval_interval != 0:
        validate(t)
    model_state = model_weights(t.parallel, t.model, args.lora_rank, run.world_size)
    if run.is_main:
        save_final_model(args.out_dir, t.model, model_state, run.tokenizer)
        if args.lora_rank:
            save_atomically(os.path.join(args.out_dir, ADAPTER_DIR),
                            lambda tmp: write_adapter_dir(tmp, t.model.state_dict(), args))
    if run.world_size > 1:
        dist.barrier()
    t.logger.close()
    if run.is_main:
        print(f"done: {progress.step} steps, {progress.tokens_seen / 1e6:.2f}M tokens, {t.validation}; "
              f"model saved to {args.out_dir}/")
    return t.val_loss


def main(argv=None):
    args = parse_args(argv)
    error, stopped = None, None
    # train() turns Ctrl-C and SIGTERM into "stop after this step"; a caller in the same process (tests,
    # a notebook) gets its own handlers back when it returns.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        train(args)
    except Stopped as e:
        stopped = e.signum
    except (Fatal, DataError) as e:
        # From a DataLoader worker the message carries the worker's traceback; its last line is ours.
        last_line = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        error = last_line.split("DataError: ", 1)[-1]
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if dist.is_initialized():
            dist.destroy_process_group()
        # DataLoader workers ignore SIGTERM (see modes.ignore_stop_signals). After an error the loader's
        # shutdown (run by gc) may leave them waiting, and the interpreter's exit would wait for them forever.
        gc.collect()
        for child in multiprocessing.active_children():
            child.kill()
    if error is not None:
        sys.exit(f"error: {error}")
    if stopped is not None:
        sys.exit(128 + stopped)


if __name__ == "__main__":
    main()
