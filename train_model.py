"""Pretrain or fine-tune (SFT) a Tiny-LLM model, on one CPU or GPU or, under torchrun, on many.

    python train_model.py --data_path data/pretrain_poetry.jsonl.gz --out_dir base_model
    python train_model.py --data_path data/sft_poetry.jsonl.gz --init_from base_model --out_dir sft_model
    torchrun --nproc_per_node 8 train_model.py ...   (DDP; add --fsdp to shard the model)
    python train_model.py --data_path corpus/ --token_cache corpus.bin --num_workers 4 ...
                                                      (shards: .jsonl, .jsonl.gz, .parquet; globs work too)

A step is one optimizer step: batch_size x accumulation_steps x world_size samples. The run ends after
--max_steps or when --epochs passes over the data are done. out_dir becomes a Hugging Face model
directory; out_dir/metrics.jsonl logs every --log_interval steps and every evaluation.
"""
import argparse
import contextlib
import gc
import json
import math
import multiprocessing
import os
import shlex
import shutil
import signal
import sys
import time
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import (DataError, PretrainDataset, SFTDataset, build_token_cache, collate, data_files,
                     estimate_samples_per_epoch)
from model import ModelConfig, Transformer

STATE_FILE = "training_state.pt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out", help="where the model, checkpoints and metrics go")
    p.add_argument("--data_path", nargs="+", default=["data/pretrain_poetry.jsonl.gz"],
                   help="files (.jsonl, .jsonl.gz, .parquet), directories of them or glob patterns; "
                        "read in sorted path order as one corpus")
    p.add_argument("--tokenizer_path", default="custom_tokenizer")
    p.add_argument("--mode", choices=["auto", "pretrain", "sft"], default="auto",
                   help="auto: sft when a --data_path name contains 'sft'")
    p.add_argument("--init_from", default=None, help="model directory to start from (SFT on a base model)")
    p.add_argument("--resume", default=None, help="checkpoint directory, or 'auto' for the newest in out_dir")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps; sets the LR schedule's length")
    p.add_argument("--batch_size", type=int, default=8, help="samples per micro-batch on each process")
    p.add_argument("--accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=3e-4, help="peak LR (AdamW's, and Muon's unless set)")
    p.add_argument("--warmup_iters", type=int, default=100)
    p.add_argument("--lr_schedule", default="cosine", choices=["cosine", "wsd"],
                   help="after warmup: cosine down to a tenth of the peak at the last step, or wsd "
                        "(warmup-stable-decay): the peak until the last --decay_fraction of the steps, then "
                        "a cool-down to zero; a wsd run resumed with a larger --max_steps cools down again")
    p.add_argument("--decay_fraction", type=float, default=0.2, help="wsd: share of the steps that cool down")
    p.add_argument("--decay_shape", default="1-sqrt", choices=["linear", "1-sqrt"],
                   help="wsd: the cool-down's shape; 1-sqrt keeps the LR higher for longer")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"],
                   help="muon: torch.optim.Muon for the weight matrices of the blocks, AdamW for the rest")
    p.add_argument("--muon_learning_rate", type=float, default=None,
                   help="Muon's peak LR; default --learning_rate (Muon's update is scaled to AdamW's RMS)")
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm; 0 disables clipping")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA (float16 without bf16 support), float32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fsdp", action="store_true", help="under torchrun, shard the model with FSDP2")
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
        p.add_argument(f"--{field}", type=int, default=getattr(ModelConfig, field))
    p.add_argument("--dropout", type=float, default=ModelConfig.dropout)
    p.add_argument("--log_interval", type=int, default=10)
    p.add_argument("--eval_interval", type=int, default=200)
    p.add_argument("--eval_batches", type=int, default=20, help="validation batches per evaluation")
    p.add_argument("--eval_tasks", default=None, metavar="TASKS",
                   help="comma-separated lm-eval tasks (e.g. tiny_llm_poetry, see eval.py) scored at each "
                        "evaluation and logged to metrics.jsonl; off by default")
    p.add_argument("--save_interval", type=int, default=1000, help="checkpoint every N steps; 0: never")
    p.add_argument("--save_total_limit", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num_workers", type=int, default=0,
                   help="DataLoader worker processes; also the processes that build --token_cache (at least 1)")
    p.add_argument("--token_cache", default=None, metavar="PATH",
                   help="pretraining: tokenize the data once into PATH (memmap) and read it from there; "
                        "for several epochs or many GPUs. An interrupted build continues on the next run")
    p.add_argument("--strict", action="store_true", help="stop at the first bad input line")
    p.add_argument("--max_bad_fraction", type=float, default=0.01, help="stop if more lines are bad")
    p.add_argument("--max_bad_steps", type=int, default=10,
                   help="stop after this many optimizer steps in a row with a non-finite loss or gradient")
    p.add_argument("--use_swanlab", action="store_true", help="log to SwanLab")
    p.add_argument("--swanlab_mode", default="local", choices=["local", "offline", "online", "disabled"],
                   help="online needs `swanlab login`; local and offline never ask for anything")
    p.add_argument("--swanlab_project", default="Tiny-LLM")
    return p.parse_args(argv)


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


class Fatal(Exception):
    """A problem the user must fix; main() prints it as one line and exits."""


class Stopped(Exception):
    """A stop signal ended the run; main() exits with 128 + its number, as shells and schedulers expect
    (130 for Ctrl-C, 143 for SIGTERM), so that a job script does not carry on as if training had finished."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


# --- set-up ----------------------------------------------------------------------------------------

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
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise Fatal(f"unknown --device {args.device!r}; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Fatal(f"--device {args.device} asked for, but no CUDA GPU is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise Fatal(f"--device {args.device}: only cpu and cuda are supported")
    dtype = args.dtype
    if device.type == "cpu":
        if dtype in ("bfloat16", "float16") and os.environ.get("RANK", "0") == "0":
            print(f"warning: --dtype {dtype} on CPU is slow (no half-precision units); training in float32",
                  file=sys.stderr)
        dtype = "float32"
    elif dtype == "auto":
        # Native bf16 only (Ampere and later). By default torch also counts bf16 that pre-Ampere GPUs
        # (T4, V100) emulate, slowly; there float16 with loss scaling is the fast choice.
        dtype = "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    return device, getattr(torch, dtype)


def check_arguments(args):
    for name in ("batch_size", "accumulation_steps", "epochs", "max_seq_len", "log_interval",
                 "eval_interval", "eval_batches", "save_total_limit"):
        if getattr(args, name) <= 0:
            raise Fatal(f"--{name} must be positive, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps <= 0:
        raise Fatal(f"--max_steps must be positive, got {args.max_steps}")
    if not 0 < args.decay_fraction <= 1:
        raise Fatal(f"--decay_fraction must be in (0, 1], got {args.decay_fraction}")
    if args.optimizer == "muon" and args.fsdp:
        raise Fatal("--optimizer muon does not work with --fsdp: Muon orthogonalises each weight matrix whole, "
                    "and FSDP2 shards them over the ranks; drop --fsdp (DDP) or use --optimizer adamw")
    try:
        data_files(args.data_path)
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
    return "sft" if any("sft" in name for name in names) else "pretrain"


def build_model(args, tokenizer, resume_dir):
    """A new model from the arguments, or the weights of --init_from or of the checkpoint to resume."""
    source = resume_dir or args.init_from
    if source is None:
        config = ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                             n_kv_heads=args.n_kv_heads, vocab_size=len(tokenizer),
                             max_seq_len=args.max_seq_len, dropout=args.dropout)
        return Transformer(config)
    if not os.path.isfile(os.path.join(source, "model.safetensors")):
        raise Fatal(f"{source} holds no model.safetensors; pass a directory written by train_model.py")
    try:
        model = Transformer.from_pretrained(source, strict=True, dropout=args.dropout)
    except (ValueError, RuntimeError) as e:
        raise Fatal(f"cannot load {source}: {' '.join(str(e).split())[:300]}")
    if model.config.vocab_size != len(tokenizer):
        raise Fatal(f"{source} has a vocabulary of {model.config.vocab_size} tokens but the tokenizer in "
                    f"{args.tokenizer_path} has {len(tokenizer)}; use the tokenizer the model was trained with")
    if args.max_seq_len > model.config.max_seq_len:
        raise Fatal(f"--max_seq_len {args.max_seq_len} is longer than the {model.config.max_seq_len} "
                    f"positions {source} supports; pass --max_seq_len {model.config.max_seq_len} or less")
    return model


def make_grad_scaler(device, dtype):
    """Loss scaling exists for float16's narrow range; bfloat16 has float32's range and needs none."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def make_optimizers(model, args, device):
    """The optimizers of a step, as a list.

    adamw: one AdamW; weights of matmuls and embeddings decay, norms (1-D parameters) do not.
    muon: torch.optim.Muon for the 2-D weights inside the blocks (attention and MLP projections), AdamW for
    the embedding (tied to the output head) and the norms, which Muon's orthogonalised update does not
    suit. Muon's update is scaled to the RMS of AdamW's (adjust_lr_fn="match_rms_adamw", Moonshot's rule),
    so --learning_rate serves both unless --muon_learning_rate is given."""
    named = list(model.named_parameters())
    to_muon = {name for name, p in named if args.optimizer == "muon" and p.dim() == 2 and "layers." in name}
    decay = [p for name, p in named if name not in to_muon and p.dim() >= 2]
    no_decay = [p for name, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizers = [torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95), eps=1e-8,
                                    fused=device.type == "cuda")]
    if to_muon:
        optimizers.insert(0, torch.optim.Muon([p for name, p in named if name in to_muon],
                                              lr=muon_learning_rate(args), weight_decay=args.weight_decay,
                                              adjust_lr_fn="match_rms_adamw"))
    return optimizers


def lr_at(step, peak, max_steps, args):
    """The schedule of the run's arguments at step, for a peak learning rate."""
    return get_lr(step, peak, args.warmup_iters, max_steps, args.lr_schedule, args.decay_fraction,
                  args.decay_shape)


def muon_learning_rate(args):
    return args.learning_rate if args.muon_learning_rate is None else args.muon_learning_rate


def ignore_stop_signals(worker_id):
    """DataLoader workers leave Ctrl-C and SIGTERM to the main process, which stops after the step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(args, tokenizer, split, rank, world_size, device, start_sample=0):
    if args.mode == "sft":
        dataset_class = SFTDataset
    else:
        dataset_class = partial(PretrainDataset, token_cache=args.token_cache if split == "train" else None)
    dataset = dataset_class(args.data_path, tokenizer, args.max_seq_len, split=split,
                            epochs=args.epochs if split == "train" else 1, rank=rank,
                            world_size=world_size, batch_size=args.batch_size, start_sample=start_sample,
                            strict=args.strict, max_bad_fraction=args.max_bad_fraction, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                        collate_fn=partial(collate, pad_id=tokenizer.pad_token_id),
                        pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)
    return dataset, loader


def wrap_model(raw_model, args, world_size, device, dtype):
    """The model as it trains: plain on one process, DDP under torchrun, FSDP2 with --fsdp."""
    if world_size == 1:
        return raw_model
    if args.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in raw_model.layers:
            fully_shard(block, mp_policy=policy)
        return fully_shard(raw_model, mp_policy=policy)
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None)


def prepare_token_cache(args, tokenizer, is_main, world_size, device):
    """Rank 0 tokenizes the training split into --token_cache unless it is up to date; the rest wait.
    A stop signal ends the build where it is (it continues on the next run) and the run with it."""
    if is_main:
        streaming, _ = make_loader(argparse.Namespace(**{**vars(args), "token_cache": None}),
                                   tokenizer, "train", 0, 1, device)

        def stop(signum, frame):
            raise Stopped(signum)
        handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            build_token_cache(streaming, args.token_cache, num_workers=args.num_workers)
        except Stopped:
            print(f"stopped by a signal while building {args.token_cache}; the next run continues it")
            raise
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    if world_size > 1:
        dist.barrier()


# --- checkpoints -----------------------------------------------------------------------------------

def fsync_tree(path):
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_model_dir(path, model, state_dict, tokenizer):
    """A complete Hugging Face model directory: config, safetensors, tokenizer, generation config.

    bos, eos and pad ids are the tokenizer's own, so that config.json, generation_config.json and the
    tokenizer agree (bos is <|endoftext|>, see tokenizer.py). Generation stops at <|im_end|> or
    <|endoftext|>, whichever comes first."""
    from transformers import GenerationConfig
    token_ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                 "pad_token_id": tokenizer.pad_token_id}
    model.save_pretrained(path, state_dict=state_dict, token_ids=token_ids)
    tokenizer.save_pretrained(path)
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    GenerationConfig(**{**token_ids, "eos_token_id": [tokenizer.eos_token_id, end_of_text]}).save_pretrained(path)


def save_atomically(path, write):
    """Run write(tmp_dir), fsync it, then rename it to path: a crash leaves the old path or the new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    fsync_tree(tmp)
    if os.path.isdir(path):
        old = f"{path}.old{os.getpid()}"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)
    fsync_tree(os.path.dirname(os.path.abspath(path)))


def list_checkpoints(out_dir):
    """Complete checkpoints in out_dir, oldest first."""
    if not os.path.isdir(out_dir):
        return []
    steps = [int(name.split("-")[1]) for name in os.listdir(out_dir)
             if name.startswith("checkpoint-") and name.split("-")[1].isdigit()
             and all(os.path.isfile(os.path.join(out_dir, name, f)) for f in (STATE_FILE, "model.safetensors"))]
    return [os.path.join(out_dir, f"checkpoint-{s}") for s in sorted(steps)]


def remove_debris(out_dir):
    """Temporary directories left by a run that was killed while saving or deleting a checkpoint."""
    if os.path.isdir(out_dir):
        for name in os.listdir(out_dir):
            if ".tmp" in name or ".deleting" in name or ".old" in name:
                shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


def full_model_state(model):
    """The unsharded model state dict, on CPU, whether the model is plain, DDP or FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_state(model, optimizers):
    """Unsharded model and optimizer state dicts, on CPU (one optimizer state dict for all the
    optimizers, keyed by parameter names)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return full_model_state(model), get_optimizer_state_dict(model, optimizers, options=options)


def load_optimizer_state(model, optimizers, state):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizers, state, options=StateDictOptions(full_state_dict=True))


# --- the run ---------------------------------------------------------------------------------------

class Logger:
    """metrics.jsonl, SwanLab and the progress bar; only rank 0 writes anything."""

    def __init__(self, args, is_main, start_step, total_steps):
        self.is_main, self.swanlab = is_main, None
        self.path = os.path.join(args.out_dir, "metrics.jsonl")
        if not is_main:
            return
        os.makedirs(args.out_dir, exist_ok=True)
        kept = []
        if start_step > 0 and os.path.exists(self.path):
            # A resumed run continues the file; entries past the checkpoint are redone, so they go.
            with open(self.path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= start_step]
        with open(self.path, "w") as f:
            f.writelines(kept)
        if args.use_swanlab:
            import swanlab
            self.swanlab = swanlab.init(project=args.swanlab_project, mode=args.swanlab_mode,
                                        config=vars(args), log_dir=os.path.join(args.out_dir, "swanlog"))
        self.bar = tqdm(total=total_steps, initial=start_step, desc=args.mode, dynamic_ncols=True,
                        disable=None)

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


def all_reduce_sum(values, device, world_size):
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def token_byte_lengths(tokenizer):
    """UTF-8 bytes of the text each token id stands for, 0 for special tokens: the denominator of
    bits per byte, a loss that does not depend on the tokenizer.

    Byte-level BPE writes each byte as one printable character (GPT-2's table); a token's bytes are its
    characters mapped back. Decoding a token on its own would not do: a token that holds part of a
    multi-byte character decodes to U+FFFD."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    lengths = torch.zeros(len(tokenizer), dtype=torch.long)
    for token, i in tokenizer.get_vocab().items():
        if i not in special:
            lengths[i] = sum(1 if c in byte_of else len(c.encode("utf-8")) for c in token)
    return lengths


@torch.no_grad()
def evaluate(model, loader, args, device, autocast, world_size, token_bytes):
    """Validation loss per token and bits per byte over up to --eval_batches batches on each rank, summed
    over all ranks; (None, None) when the validation split is empty (a file of under 200 lines has none).

    bits per byte = nll (nats) / (ln 2 * bytes) over the predicted tokens that stand for text; special
    tokens (<|endoftext|>, <|im_end|>) have no bytes and are left out of both sums."""
    model.eval()
    loss_sum, tokens, text_loss_sum, text_bytes = 0.0, 0, 0.0, 0
    token_bytes = token_bytes.to(device)
    batches = iter(loader)
    for _ in range(args.eval_batches):
        batch = next(batches, None)
        if all_reduce_sum([batch is not None], device, world_size)[0] == 0:
            break
        if batch is None:
            # Ranks may hold one batch more than others. Every rank must run the same number of forwards
            # (DDP broadcasts buffers, FSDP all-gathers weights), so this one runs a forward counting nothing.
            batch = {"input_ids": torch.zeros((1, 2), dtype=torch.long),
                     "labels": torch.full((1, 2), -100, dtype=torch.long)}
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        targets = batch["labels"][:, 1:].to(device, non_blocking=True)
        with autocast:
            logits = model(input_ids).logits[:, :-1]
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                              reduction="none")
        target_bytes = torch.where(targets != -100, token_bytes[targets.clamp(min=0)], 0).flatten()
        loss_sum += nll.sum().item()
        tokens += int((targets != -100).sum())
        text_loss_sum += nll[target_bytes > 0].sum().item()
        text_bytes += int(target_bytes.sum())
    model.train()
    loss_sum, tokens, text_loss_sum, text_bytes = all_reduce_sum(
        [loss_sum, tokens, text_loss_sum, text_bytes], device, world_size)
    if not tokens:
        return None, None
    return loss_sum / tokens, text_loss_sum / (math.log(2) * text_bytes) if text_bytes else None


def task_scores(model, raw_model, tokenizer, args, device, world_size, is_main):
    """--eval_tasks: {"task/metric": value} from lm-eval for the model as it is now. Rank 0 saves it to a
    temporary model directory and evaluates that with eval.py; the other ranks wait."""
    state_dict = full_model_state(model) if world_size > 1 else raw_model.state_dict()
    scores = {}
    if is_main:
        import tempfile
        from eval import evaluate as evaluate_tasks, make_lm, scores as score_rows
        with tempfile.TemporaryDirectory() as tmp:
            write_model_dir(tmp, raw_model, state_dict, tokenizer)
            results = evaluate_tasks(make_lm(tmp, str(device), args.batch_size), args.eval_tasks.split(","))
        scores = {f"{row['task']}/{row['metric']}": round(row["value"], 6) for row in score_rows(results)}
    if world_size > 1:
        dist.barrier()
    return scores


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_flops(device, dtype, seconds=0.5):
    """This device's achieved matmul FLOP/s, the denominator of MFU (bench.py measures it the same way).

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


def train(args):
    check_arguments(args)
    device, dtype = resolve_device_and_dtype(args)
    rank, world_size, device = setup_distributed(device)
    is_main = rank == 0
    args.mode = training_mode(args)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)  # SFTDataset checks its chat template

    resume_dir = args.resume
    if resume_dir == "auto":
        checkpoints = list_checkpoints(args.out_dir)
        resume_dir = checkpoints[-1] if checkpoints else None
        if is_main:
            print(f"resuming from {resume_dir}" if resume_dir else f"no checkpoint in {args.out_dir}; "
                  "starting from scratch")
    if resume_dir and not os.path.isfile(os.path.join(resume_dir, STATE_FILE)):
        raise Fatal(f"{resume_dir} is not a checkpoint (no {STATE_FILE}); pass a checkpoint-N directory")
    state = torch.load(os.path.join(resume_dir, STATE_FILE), weights_only=False) if resume_dir else None

    torch.manual_seed(args.seed)
    model = build_model(args, tokenizer, resume_dir)
    if args.mode == "sft" and args.init_from is None and resume_dir is None and is_main:
        print("warning: SFT on a randomly initialised model; pass --init_from a pretrained model",
              file=sys.stderr)
    raw_model = model.to(device)
    flops_per_token = raw_model.flops_per_token(args.max_seq_len)
    model = wrap_model(raw_model, args, world_size, device, dtype)
    optimizers = make_optimizers(model, args, device)
    start_step, samples_seen, tokens_seen = 0, 0, 0
    if state is not None:
        load_optimizer_state(model, optimizers, state["optimizer"])
        start_step, samples_seen, tokens_seen = state["step"], state["samples_seen"], state["tokens_seen"]
    # `model` (plain, DDP or FSDP) owns the state dicts and gradient sync; `forward` may be compiled.
    forward = torch.compile(model) if args.compile else model

    samples_per_step = args.batch_size * args.accumulation_steps * world_size
    if args.token_cache and args.mode == "pretrain":
        prepare_token_cache(args, tokenizer, is_main, world_size, device)
    train_set, train_loader = make_loader(args, tokenizer, "train", rank, world_size, device, samples_seen)
    _, val_loader = make_loader(args, tokenizer, "val", rank, world_size, device)
    # Reading the first lines also checks the data file before any training.
    estimated_steps = math.ceil(estimate_samples_per_epoch(train_set, report=is_main) * args.epochs
                                / samples_per_step)
    if args.max_steps:
        max_steps = args.max_steps
    elif state is not None:
        max_steps = state["max_steps"]  # keep the schedule of the run being resumed
    else:
        max_steps = estimated_steps
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_amp = dtype != torch.float32
    autocast = torch.autocast(device.type, dtype=dtype) if use_amp else contextlib.nullcontext()
    scaler = make_grad_scaler(device, dtype)
    if state is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    peak_flops = measure_matmul_flops(device, dtype)

    if is_main:
        remove_debris(args.out_dir)
    logger = Logger(args, is_main, start_step, max_steps)
    # Wall time of the run, continued across resumes: report.py plots the losses against it.
    run_start = time.time() - (state.get("elapsed_s", 0.0) if state is not None else 0.0)

    def elapsed():
        return time.time() - run_start
    logger.write(f"{args.mode}: {raw_model.num_params() / 1e6:.2f}M parameters, {world_size} process(es) "
                 f"on {device.type}, {dtype}, {samples_per_step} samples x {args.max_seq_len} tokens "
                 f"per step, {max_steps} steps" + (f", resumed at step {start_step}" if start_step else ""))

    stop_signal = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop_signal.append(signum))

    def save_checkpoint(step):
        model_state, optimizer_state = full_state(model, optimizers)
        if is_main:
            path = os.path.join(args.out_dir, f"checkpoint-{step}")

            def write(tmp):
                write_model_dir(tmp, raw_model, model_state, tokenizer)
                torch.save({"step": step, "max_steps": max_steps, "samples_seen": samples_seen,
                            "tokens_seen": tokens_seen, "elapsed_s": elapsed(),
                            "optimizer": optimizer_state, "scaler": scaler.state_dict(),
                            "args": vars(args)}, os.path.join(tmp, STATE_FILE))
            save_atomically(path, write)
            for old in list_checkpoints(args.out_dir)[:-args.save_total_limit]:
                # Rename first: a half-deleted directory must not look like a checkpoint.
                doomed = f"{old}.deleting{os.getpid()}"
                os.rename(old, doomed)
                shutil.rmtree(doomed)
        if world_size > 1:
            dist.barrier()  # nobody reads or resumes from a checkpoint that is still being written
        return os.path.join(args.out_dir, f"checkpoint-{step}")

    token_bytes = token_byte_lengths(tokenizer)

    def validate(step):
        val_loss, val_bpb = evaluate(model, val_loader, args, device, autocast, world_size, token_bytes)
        record, message = {"step": step, "tokens": tokens_seen, "elapsed_s": round(elapsed(), 1)}, []
        if val_loss is not None:
            record.update(val_loss=round(val_loss, 6), val_ppl=round(math.exp(val_loss), 3))
            message.append(f"val_loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f}")
        if val_bpb is not None:
            record["val_bpb"] = round(val_bpb, 6)
            message.append(f"bpb {val_bpb:.4f}")
        if args.eval_tasks:
            scores = task_scores(model, raw_model, tokenizer, args, device, world_size, is_main)
            record.update(scores)
            message.append(", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        if message:
            logger.log(record)
            logger.write(f"step {step}: " + ", ".join(message))
        return val_loss

    model.train()
    batches = iter(train_loader)
    bad_steps_in_row, step, val_loss, checkpoint = 0, start_step, None, None
    interval_seconds, interval_tokens = 0.0, 0  # training time only: evaluations and saves excluded
    while step < max_steps or args.max_steps is None:
        step_start = time.perf_counter()
        # Dropout masks depend only on (seed, step, rank), so a resumed run draws the same ones.
        torch.manual_seed(args.seed + 1_000_003 * step + rank)
        lr = lr_at(step, args.learning_rate, max_steps, args)
        for optimizer in optimizers:  # Muon's peak may differ from AdamW's; the schedule is the same
            optimizer_lr = lr_at(step, muon_learning_rate(args), max_steps, args) \
                if isinstance(optimizer, torch.optim.Muon) else lr
            for group in optimizer.param_groups:
                group["lr"] = optimizer_lr
        micro_batches = [b for b in (next(batches, None) for _ in range(args.accumulation_steps))
                         if b is not None]
        local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
        # One collective agrees on three things: the step's token count, whether any rank ran out of data,
        # and whether any rank was asked to stop (signals reach ranks at different moments).
        step_tokens, short_ranks, stopping = all_reduce_sum(
            [local_tokens, len(micro_batches) < args.accumulation_steps, bool(stop_signal)], device, world_size)
        if stopping:
            path = checkpoint or save_checkpoint(step)
            logger.write(f"stopped by a signal after step {step}; checkpoint in {path}.\n"
                         f"resume with: {resume_command(path)}")
            logger.close()
            # A rank stopped on another rank's behalf got no signal itself; it stops as if sent SIGTERM.
            raise Stopped(stop_signal[0] if stop_signal else signal.SIGTERM)
        if short_ranks:
            break  # the data is used up (on some rank): drop the incomplete last step everywhere
        if step_tokens == 0:
            # Possible in SFT when truncation cut off every answer in the step: nothing to learn from.
            logger.write(f"step {step + 1}: no labelled tokens (answers truncated away?); skipped")
            step += 1
            samples_seen += samples_per_step
            continue
        loss_sum = torch.zeros((), device=device)
        for i, batch in enumerate(micro_batches):
            input_ids = batch["input_ids"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            # Gradients are averaged over ranks after the last micro-batch only (set before its forward).
            sync = i == len(micro_batches) - 1
            if world_size > 1 and args.fsdp:
                model.set_requires_gradient_sync(sync)
            no_sync = model.no_sync() if world_size > 1 and not args.fsdp and not sync else contextlib.nullcontext()
            with no_sync:
                with autocast:
                    # DDP and FSDP average gradients over ranks, hence world_size / all tokens of the step.
                    loss = forward(input_ids, labels=labels, num_items_in_batch=step_tokens / world_size).loss
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        for optimizer in optimizers:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        step_loss = all_reduce_sum([loss_sum.item()], device, world_size)[0] / world_size
        finite = math.isfinite(step_loss) and (scaler.is_enabled() or math.isfinite(float(grad_norm)))
        if finite:
            for optimizer in optimizers:
                scaler.step(optimizer)  # with float16, GradScaler itself skips steps with inf gradients
            scaler.update()
            bad_steps_in_row = 0
        else:
            bad_steps_in_row += 1
            logger.write(f"step {step + 1}: non-finite loss {step_loss} or gradient norm {float(grad_norm)}; "
                         "skipped the update")
            if bad_steps_in_row >= args.max_bad_steps:
                raise Fatal(f"{bad_steps_in_row} steps in a row had a non-finite loss or gradient; stopping. "
                            "Lower --learning_rate, check the data, or resume from the last checkpoint")
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        step += 1
        samples_seen += samples_per_step
        tokens_seen += int(step_tokens)
        interval_tokens += int(step_tokens)
        interval_seconds += time.perf_counter() - step_start

        if is_main:
            logger.bar.update(1)
        if step % args.log_interval == 0 or step == max_steps:
            tokens_per_sec = interval_tokens / interval_seconds
            # MFU counts all positions (padding too): it measures the hardware, not the data.
            mfu = flops_per_token * tokens_per_sec / world_size / peak_flops
            logger.log({"step": step, "loss": round(step_loss, 6), "lr": lr, "tokens": tokens_seen,
                        "elapsed_s": round(elapsed(), 1),
                        "tokens_per_sec": round(tokens_per_sec, 1),
                        "tokens_per_sec_per_device": round(tokens_per_sec / world_size, 1),
                        "mfu": round(mfu, 4), "grad_norm": round(float(grad_norm), 4)})
            if is_main:
                logger.bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:.0f}",
                                       mfu=f"{mfu:.1%}")
            interval_seconds, interval_tokens = 0.0, 0
        if step % args.eval_interval == 0:
            val_loss = validate(step)
        checkpoint = None
        if args.save_interval and step % args.save_interval == 0:
            checkpoint = save_checkpoint(step)

    if step > start_step and step % args.eval_interval != 0:
        val_loss = validate(step)
    model_state = full_model_state(model) if world_size > 1 else raw_model.state_dict()
    if is_main:
        save_final_model(args.out_dir, raw_model, model_state, tokenizer)
    if world_size > 1:
        dist.barrier()
    logger.close()
    if is_main:
        summary = f"val_loss {val_loss:.4f} (perplexity {math.exp(val_loss):.2f})" if val_loss is not None \
            else "no validation lines"
        print(f"done: {step} steps, {tokens_seen / 1e6:.2f}M tokens, {summary}; model saved to {args.out_dir}/")
    return val_loss


def save_final_model(out_dir, model, state_dict, tokenizer):
    """The final model goes into out_dir itself, file by file with atomic renames (out_dir also holds
    the checkpoints and metrics, so it cannot be swapped whole)."""
    staging = os.path.join(out_dir, ".final.tmp")
    save_atomically(staging, lambda tmp: write_model_dir(tmp, model, state_dict, tokenizer))
    for name in os.listdir(staging):
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    os.rmdir(staging)


def resume_command(checkpoint):
    argv = list(sys.argv)
    if "--resume" in argv:
        i = argv.index("--resume")
        del argv[i:i + 2]
    launcher = ["torchrun", "<same options>"] if "RANK" in os.environ else [sys.executable]
    return " ".join(launcher) + " " + shlex.join([*argv, "--resume", checkpoint])


def main(argv=None):
    args = parse_args(argv)
    error, stopped = None, None
    try:
        train(args)
    except Stopped as e:
        stopped = e.signum
    except (Fatal, DataError) as e:
        # From a DataLoader worker the message carries the worker's traceback; its last line is ours.
        last_line = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        error = last_line.split("DataError: ", 1)[-1]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        # DataLoader workers ignore SIGTERM (see ignore_stop_signals). After an error the loader's shutdown
        # (run by gc) may leave them waiting, and the interpreter's exit would wait for them forever.
        gc.collect()
        for child in multiprocessing.active_children():
            child.kill()
    if error is not None:
        sys.exit(f"error: {error}")
    if stopped is not None:
        sys.exit(128 + stopped)


if __name__ == "__main__":
    main()
