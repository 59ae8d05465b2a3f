"""Pretrain, fine-tune (SFT) or align (DPO) a Tiny-LLM model, fully or with LoRA adapters, on one CPU or
GPU or, under torchrun, on many.

    python train_model.py --data_path data/pretrain_poetry.jsonl.gz --out_dir base_model
    python train_model.py --data_path data/sft_poetry.jsonl.gz --init_from base_model --out_dir sft_model
    python train_model.py --mode dpo --data_path data/dpo_poetry.jsonl.gz --init_from sft_model \
        --lora_rank 16 --out_dir dpo_model
    torchrun --nproc_per_node 8 train_model.py ...   (DDP; add --fsdp to shard the model)
    python train_model.py --data_path corpus/ --token_cache corpus.bin --num_workers 4 ...
                                                      (shards: .jsonl, .jsonl.gz, .parquet; globs work too)

The modes share one loop and differ in their data set and their objective (LanguageModelLoss, DPOLoss).
LoRA is PEFT's, injected into our modules; checkpoints then hold only the adapters and their optimizer
state, and the final model is written merged, with the PEFT adapter directory beside it.

By default, pretraining from scratch uses Muon (the blocks' matrices) + AdamW (the rest) with a
warmup-stable-decay schedule; fine-tuning (--init_from) and --fsdp use AdamW with cosine; a resumed run
keeps its checkpoint's (choose_recipe says why; --optimizer and --lr_schedule choose otherwise).

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

from corpus import DataError, data_files
from dataset import (PreferenceDataset, PretrainDataset, SFTDataset, collate, collate_preferences,
                     estimate_samples_per_epoch)
from token_cache import build_token_cache
from model import _LAYER_NAMES, ModelConfig, Transformer, to_hf_name

STATE_FILE = "training_state.pt"
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
MUON_LEARNING_RATE = 8e-3  # measured on the demo's model and on the default one (README, Speed)
ADAPTER_DIR = "adapter"  # in out_dir: the final adapter, for peft.PeftModel.from_pretrained
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out", help="where the model, checkpoints and metrics go")
    p.add_argument("--data_path", nargs="+", default=["data/pretrain_poetry.jsonl.gz"],
                   help="files (.jsonl, .jsonl.gz, .parquet), directories of them or glob patterns; "
                        "read in sorted path order as one corpus")
    p.add_argument("--val_data_path", nargs="+", default=None,
                   help="validate on every record of these files (same forms) instead of every 200th of --data_path")
    p.add_argument("--tokenizer_path", default="custom_tokenizer")
    p.add_argument("--mode", choices=["auto", "pretrain", "sft", "dpo"], default="auto",
                   help="auto: sft when a --data_path name contains 'sft', dpo when it contains 'dpo'; dpo "
                        "trains on preference pairs against the frozen --init_from model")
    p.add_argument("--dpo_beta", type=float, default=0.1,
                   help="DPO: how far the model may move from the reference (higher: less far)")
    p.add_argument("--init_from", default=None, help="model directory to start from (SFT on a base model)")
    p.add_argument("--resume", default=None, help="checkpoint directory, or 'auto' for the newest in out_dir")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps; sets the LR schedule's length")
    p.add_argument("--batch_size", type=int, default=8, help="samples per micro-batch on each process")
    p.add_argument("--accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=3e-4,
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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA (float16 without bf16 support), float32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fsdp", action="store_true", help="under torchrun, shard the model with FSDP2")
    p.add_argument("--lora_rank", type=int, default=0,
                   help="train LoRA adapters of this rank (PEFT) on the frozen --init_from model; 0: off")
    p.add_argument("--lora_alpha", type=float, default=16.0, help="LoRA's scale is lora_alpha / lora_rank")
    p.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the adapters' input")
    p.add_argument("--lora_targets", default=",".join(LORA_TARGETS),
                   help="comma-separated modules that get adapters, by our names (wq,wk,wv,wo: attention; "
                        "w1,w2,w3: MLP) or Hugging Face's (q_proj, ..., gate_proj, down_proj, up_proj)")
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
    if training_mode(args) == "dpo":
        if args.init_from is None:
            raise Fatal("--mode dpo needs --init_from: the model to improve, which is also the frozen reference")
        if args.dpo_beta <= 0:
            raise Fatal(f"--dpo_beta must be positive, got {args.dpo_beta}")
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


def choose_recipe(args, resume_dir, state):
    """Resolves --optimizer auto and --lr_schedule auto, in place.

    auto is Muon + WSD to pretrain from scratch: on the demo it reaches AdamW + cosine's final val_bpb in
    0.52x the time, and at the default model size it is ahead per step (README, Speed). Fine-tuning
    (--init_from: SFT, DPO, LoRA) keeps the seed's AdamW + cosine, the recipe measured there, and so does
    --fsdp, which shards the matrices Muon must see whole. A resumed run keeps its checkpoint's optimizer
    (its state is that optimizer's) and, unless given, its schedule and Muon LR; checkpoints without these
    were AdamW + cosine's, and a Muon checkpoint without a Muon LR ran Muon at --learning_rate."""
    trained = state["args"] if state is not None else None
    trained_optimizer = trained.get("optimizer", "adamw") if trained is not None else None
    if args.optimizer == "auto":
        args.optimizer = trained_optimizer or ("muon" if args.init_from is None and not args.fsdp else "adamw")
    if trained_optimizer not in (None, args.optimizer):
        raise Fatal(f"{resume_dir} was trained with --optimizer {trained_optimizer}, whose state "
                    f"it holds; resume it with that optimizer, not {args.optimizer}")
    if args.optimizer == "muon" and args.fsdp:
        raise Fatal("--optimizer muon does not work with --fsdp: Muon orthogonalises each weight matrix whole, "
                    "and FSDP2 shards them over the ranks; drop --fsdp (DDP), or start a new run with "
                    "--optimizer adamw")
    if args.lr_schedule == "auto":
        args.lr_schedule = trained.get("lr_schedule", "cosine") if trained is not None else \
            "wsd" if args.optimizer == "muon" else "cosine"
    if args.muon_learning_rate is None:
        args.muon_learning_rate = trained.get("muon_learning_rate") or trained["learning_rate"] \
            if trained_optimizer == "muon" else MUON_LEARNING_RATE


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
    except (ValueError, RuntimeError) as e:
        raise Fatal(f"cannot load {source}: {' '.join(str(e).split())[:300]}")
    if model.config.vocab_size != len(tokenizer):
        raise Fatal(f"{source} has a vocabulary of {model.config.vocab_size} tokens but the tokenizer in "
                    f"{args.tokenizer_path} has {len(tokenizer)}; use the tokenizer the model was trained with")
    if args.max_seq_len > model.config.max_seq_len:
        raise Fatal(f"--max_seq_len {args.max_seq_len} is longer than the {model.config.max_seq_len} "
                    f"positions {source} supports; pass --max_seq_len {model.config.max_seq_len} or less")
    if args.lora_rank:
        model = add_lora(model, args)
        if resume_dir:
            load_adapter(model, resume_dir)
    return model


# --- LoRA (PEFT) -------------------------------------------------------------------------------------

def lora_hf_names():
    """{wq: q_proj, ..., w3: up_proj}: the modules LoRA can target, by our names and Hugging Face's."""
    return {ours.split(".")[-1]: to_hf_name(f"layers.0.{ours}.weight").split(".")[-2]
            for ours in _LAYER_NAMES if ours.split(".")[-1] in LORA_TARGETS}


def lora_target_names(targets):
    """Our module names (wq, ..., w3) for --lora_targets, which may use Hugging Face's (q_proj, ...)."""
    ours_of = {**{name: name for name in LORA_TARGETS}, **{hf: ours for ours, hf in lora_hf_names().items()}}
    names = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in ours_of]
    if unknown or not names:
        raise Fatal(f"--lora_targets {targets!r}: unknown module(s) {unknown}; choose from {', '.join(ours_of)}")
    return sorted({ours_of[t] for t in names}, key=LORA_TARGETS.index)


def lora_config(args, hf_names=False):
    """PEFT's LoraConfig of the run: for our modules, or (hf_names) as adapter_config.json states it for
    the LlamaForCausalLM of --init_from."""
    from peft import LoraConfig
    targets = lora_target_names(args.lora_targets)
    if not hf_names:
        return LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          target_modules=targets)
    return LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=[lora_hf_names()[t] for t in targets], task_type="CAUSAL_LM",
                      base_model_name_or_path=os.path.abspath(args.init_from))


def add_lora(model, args):
    """PEFT's LoRA layers around the target modules, in place: the base weights are frozen, only the
    adapters (A random, B zero: the model starts as the base) train."""
    from peft import inject_adapter_in_model
    return inject_adapter_in_model(lora_config(args), model)


def is_lora_weight(name):
    return ".lora_A." in name or ".lora_B." in name


def adapter_hf_name(name):
    """layers.0.attention.wq.lora_A.default.weight -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight,
    the name PEFT's adapter files use for a LlamaForCausalLM."""
    module, lora = name.split(".lora_")
    matrix, _adapter, param = lora.split(".")
    return f"base_model.model.{to_hf_name(module + '.weight')[:-len('.weight')]}.lora_{matrix}.{param}"


def write_adapter_dir(path, state_dict, args):
    """A PEFT adapter directory: adapter_config.json and the adapter weights under Hugging Face's names."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    lora_config(args, hf_names=True).save_pretrained(path)
    weights = {adapter_hf_name(k): v.detach().float().contiguous().cpu()
               for k, v in state_dict.items() if is_lora_weight(k)}
    save_file(weights, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})


def load_adapter(model, path):
    """The adapter weights a checkpoint holds, into a model with LoRA layers of the same configuration."""
    from safetensors.torch import load_file
    if not os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS)):
        raise Fatal(f"{path} holds no LoRA adapter ({ADAPTER_WEIGHTS}): it is not a checkpoint of a LoRA run")
    saved = load_file(os.path.join(path, ADAPTER_WEIGHTS))
    ours = {adapter_hf_name(name): name for name in model.state_dict() if is_lora_weight(name)}
    mismatch = Fatal(f"{path} holds adapters for other modules or of another rank than --lora_targets and "
                     "--lora_rank ask for; resume with the run's own LoRA arguments")
    if saved.keys() != ours.keys():
        raise mismatch
    try:
        model.load_state_dict({ours[k]: v for k, v in saved.items()}, strict=False)
    except RuntimeError:
        raise mismatch


def merged_state_dict(model):
    """The model's state dict with each adapter added into its base weight: an ordinary model."""
    from peft.tuners.lora import LoraLayer
    merged = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            merged[f"{name}.weight"] = module.base_layer.weight.detach() + module.get_delta_weight("default")
    for name, tensor in model.state_dict().items():
        if not is_lora_weight(name):
            merged.setdefault(name.replace(".base_layer.", "."), tensor)
    return merged


@contextlib.contextmanager
def adapters_disabled(model):
    """The base model without its adapters (DPO's reference under LoRA: no second copy in memory)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def make_grad_scaler(device, dtype):
    """Loss scaling exists for float16's narrow range; bfloat16 has float32's range and needs none."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def make_optimizers(model, args, device):
    """The optimizers of a step, as a list.

    adamw: one AdamW; weights of matmuls and embeddings decay, norms (1-D parameters) do not.
    muon: torch.optim.Muon for the 2-D weights inside the blocks (attention and MLP projections), AdamW for
    the embedding (tied to the output head) and the norms, which Muon's orthogonalised update does not
    suit. Muon's update is scaled to the RMS of AdamW's (adjust_lr_fn="match_rms_adamw", Moonshot's rule),
    and its peak is --muon_learning_rate."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # LoRA: the adapters
    to_muon = {name for name, p in named if args.optimizer == "muon" and p.dim() == 2 and "layers." in name}
    decay = [p for name, p in named if name not in to_muon and p.dim() >= 2]
    no_decay = [p for name, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizers = [torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95), eps=1e-8,
                                    fused=device.type == "cuda")]
    if to_muon:
        optimizers.insert(0, torch.optim.Muon([p for name, p in named if name in to_muon],
                                              lr=args.muon_learning_rate, weight_decay=args.weight_decay,
                                              adjust_lr_fn="match_rms_adamw"))
    return optimizers


def recipe_summary(args):
    """The optimizer(s) and schedule in words, for the start-up line: 'Muon 0.008 + AdamW 0.0003, wsd'."""
    muon = f"Muon {args.muon_learning_rate:g} + " if args.optimizer == "muon" else ""
    return f"{muon}AdamW {args.learning_rate:g}, {args.lr_schedule}"


def lr_at(step, peak, max_steps, args):
    """The schedule of the run's arguments at step, for a peak learning rate."""
    return get_lr(step, peak, args.warmup_iters, max_steps, args.lr_schedule, args.decay_fraction,
                  args.decay_shape)


def ignore_stop_signals(worker_id):
    """DataLoader workers leave Ctrl-C and SIGTERM to the main process, which stops after the step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(args, tokenizer, split, rank, world_size, device, start_sample=0):
    collate_fn = collate_preferences if args.mode == "dpo" else collate
    if args.mode in ("sft", "dpo"):
        dataset_class = SFTDataset if args.mode == "sft" else PreferenceDataset
    else:
        dataset_class = partial(PretrainDataset, token_cache=args.token_cache if split == "train" else None)
    data_path = args.data_path
    if split == "val" and args.val_data_path is not None:
        data_path, dataset_class = args.val_data_path, partial(dataset_class, val_every=1)  # all lines held out
    dataset = dataset_class(data_path, tokenizer, args.max_seq_len, split=split,
                            epochs=args.epochs if split == "train" else 1, rank=rank,
                            world_size=world_size, batch_size=args.batch_size, start_sample=start_sample,
                            strict=args.strict, max_bad_fraction=args.max_bad_fraction, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                        collate_fn=partial(collate_fn, pad_id=tokenizer.pad_token_id),
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
    """Complete checkpoints in out_dir, oldest first. A LoRA run's hold the adapters, not the model."""
    if not os.path.isdir(out_dir):
        return []
    steps = [int(name.split("-")[1]) for name in os.listdir(out_dir)
             if name.startswith("checkpoint-") and name.split("-")[1].isdigit()
             and os.path.isfile(os.path.join(out_dir, name, STATE_FILE))
             and any(os.path.isfile(os.path.join(out_dir, name, f)) for f in ("model.safetensors", ADAPTER_WEIGHTS))]
    return [os.path.join(out_dir, f"checkpoint-{s}") for s in sorted(steps)]


def remove_debris(out_dir):
    """Temporary directories left by a run that was killed while saving or deleting a checkpoint."""
    if os.path.isdir(out_dir):
        for name in os.listdir(out_dir):
            if ".tmp" in name or ".deleting" in name or ".old" in name:
                shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


def model_weights(model, raw_model, args, world_size):
    """The state dict of the model as an ordinary checkpoint: gathered from DDP or FSDP, adapters merged."""
    if args.lora_rank:
        return merged_state_dict(raw_model)  # DDP holds the whole model on every rank; FSDP is refused
    return full_model_state(model) if world_size > 1 else raw_model.state_dict()


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


# --- what a step minimises ------------------------------------------------------------------------
# An objective gives a step's loss and the statistics logged with it, and the validation metrics. A step
# weighs every "item" of it equally, whatever micro-batch or rank holds it: a labelled token, or a pair.

class LanguageModelLoss:
    """Pretraining and SFT: cross-entropy of the labelled tokens; validation: loss per token and bits per
    byte = nll (nats) / (ln 2 * bytes) over the predicted tokens that stand for text (special tokens such as
    <|endoftext|> and <|im_end|> have no bytes and are left out of both sums)."""
    stat_names = ()
    val_names = ("nll", "tokens", "text_nll", "text_bytes")

    def __init__(self, token_bytes):
        self.token_bytes = token_bytes

    def items(self, labels):
        return int((labels[:, 1:] != -100).sum())

    def __call__(self, forward, input_ids, labels, num_items):
        return forward(input_ids, labels=labels, num_items_in_batch=num_items).loss, []

    def val_sums(self, logits, input_ids, labels):
        targets = labels[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                              reduction="none")
        self.token_bytes = self.token_bytes.to(targets.device)
        target_bytes = torch.where(targets != -100, self.token_bytes[targets.clamp(min=0)], 0).flatten()
        return [nll.sum(), (targets != -100).sum(), nll[target_bytes > 0].sum(), target_bytes.sum()]

    def val_record(self, sums):
        if not sums["tokens"]:
            return {}, []
        loss = sums["nll"] / sums["tokens"]
        record = {"val_loss": round(loss, 6), "val_ppl": round(math.exp(loss), 3)}
        message = [f"val_loss {loss:.4f}, perplexity {math.exp(loss):.2f}"]
        if sums["text_bytes"]:
            bpb = sums["text_nll"] / (math.log(2) * sums["text_bytes"])
            record["val_bpb"] = round(bpb, 6)
            message.append(f"bpb {bpb:.4f}")
        return record, message


def sequence_log_probs(logits, labels):
    """log p(labelled tokens) of each row: the sum over its tokens (labels aligned with the inputs)."""
    targets = labels[:, 1:]
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != -100)).sum(-1)


class DPOLoss:
    """Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your Language
    Model is Secretly a Reward Model"), the sigmoid loss of a pair:
        -log sigmoid(r_chosen - r_rejected),   r = beta * (log pi(answer | prompt) - log ref(answer | prompt))
    with log-probabilities summed over the answer's tokens. r is the answer's implicit reward; the pair's
    reward margin is r_chosen - r_rejected, and the reward accuracy the share of pairs where it is positive.
    Batches hold the chosen rows, then the rejected ones (dataset.collate_preferences).

    `reference(input_ids)` gives the frozen reference model's logits. Held-out preference accuracy is the
    share of pairs where the model itself gives the chosen answer the higher log-probability: unlike the
    rewards it means something before training too."""
    stat_names = ("reward_margin", "reward_accuracy")
    val_names = ("loss", "pairs", "reward_margin", "reward_accuracy", "preference_accuracy")

    def __init__(self, beta, reference):
        self.beta, self.reference = beta, reference

    def items(self, labels):
        return labels.shape[0] // 2

    def _pairs(self, logits, reference_log_probs, labels):
        """(reward margins, log pi(chosen) - log pi(rejected)) of the batch's pairs."""
        policy = sequence_log_probs(logits, labels)
        chosen, rejected = (self.beta * (policy - reference_log_probs)).chunk(2)
        policy_chosen, policy_rejected = policy.chunk(2)
        return chosen - rejected, policy_chosen - policy_rejected

    def _reference_log_probs(self, input_ids, labels):
        # Before the policy's forward: with LoRA the reference switches the adapters off and on again,
        # which must not happen between a forward and its backward.
        with torch.no_grad():
            return sequence_log_probs(self.reference(input_ids), labels)

    def __call__(self, forward, input_ids, labels, num_items):
        reference_log_probs = self._reference_log_probs(input_ids, labels)
        margin, _ = self._pairs(forward(input_ids).logits, reference_log_probs, labels)
        loss = -F.logsigmoid(margin).sum() / num_items
        return loss, [margin.detach().sum(), (margin > 0).sum()]

    def val_sums(self, logits, input_ids, labels):
        margin, preference = self._pairs(logits, self._reference_log_probs(input_ids, labels), labels)
        return [-F.logsigmoid(margin).sum(), margin.new_tensor(margin.numel()), margin.sum(), (margin > 0).sum(),
                (preference > 0).sum()]

    def val_record(self, sums):
        if not sums["pairs"]:
            return {}, []
        record = {f"val_{name}": round(sums[name] / sums["pairs"], 6) for name in self.val_names if name != "pairs"}
        return record, [f"{name} {value:.4f}" for name, value in record.items()]


def make_objective(args, raw_model, tokenizer, device):
    if args.mode != "dpo":
        return LanguageModelLoss(token_byte_lengths(tokenizer))
    if args.lora_rank:
        def reference(input_ids):
            # The model without its adapters is --init_from's; in eval mode, as a reference has no dropout.
            was_training = raw_model.training
            raw_model.eval()
            try:
                with adapters_disabled(raw_model):
                    return raw_model(input_ids).logits
            finally:
                raw_model.train(was_training)
    else:
        frozen = build_model(argparse.Namespace(**{**vars(args), "dropout": 0.0}), tokenizer, None)
        frozen = frozen.to(device).eval().requires_grad_(False)

        def reference(input_ids):
            return frozen(input_ids).logits
    return DPOLoss(args.dpo_beta, reference)


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
def evaluate(model, loader, args, device, autocast, world_size, objective):
    """The objective's validation metrics over up to --eval_batches batches on each rank, summed over all
    ranks: (record, message parts), empty when the validation split is (a file of under 200 lines has none)."""
    model.eval()
    sums = torch.zeros(len(objective.val_names), dtype=torch.float64, device=device)
    batches = iter(loader)
    for _ in range(args.eval_batches):
        batch = next(batches, None)
        if all_reduce_sum([batch is not None], device, world_size)[0] == 0:
            break
        with autocast:
            if batch is None:
                # Ranks may hold one batch more than others. Every rank must run the same number of forwards
                # (DDP broadcasts buffers, FSDP all-gathers weights), so this one runs a forward counting nothing.
                model(torch.zeros((1, 2), dtype=torch.long, device=device))
                continue
            input_ids = batch["input_ids"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            sums += torch.stack([v.double() for v in objective.val_sums(model(input_ids).logits, input_ids, labels)])
    model.train()
    return objective.val_record(dict(zip(objective.val_names, all_reduce_sum(sums.tolist(), device, world_size))))


def task_scores(model, raw_model, tokenizer, args, device, world_size, is_main):
    """--eval_tasks: {"task/metric": value} from lm-eval for the model as it is now. Rank 0 saves it to a
    temporary model directory and evaluates that with eval.py; the other ranks wait."""
    state_dict = model_weights(model, raw_model, args, world_size)
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
    choose_recipe(args, resume_dir, state)

    torch.manual_seed(args.seed)
    model = build_model(args, tokenizer, resume_dir)
    if args.mode == "sft" and args.init_from is None and resume_dir is None and is_main:
        print("warning: SFT on a randomly initialised model; pass --init_from a pretrained model",
              file=sys.stderr)
    raw_model = model.to(device)
    trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
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
    logger.write(f"{args.mode}: {raw_model.num_params() / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trained "
                 f"({trainable / raw_model.num_params():.1%}), {world_size} process(es) "
                 f"on {device.type}, {dtype}, {samples_per_step} samples x {args.max_seq_len} tokens "
                 f"per step, {max_steps} steps, {recipe_summary(args)}"
                 + (f", resumed at step {start_step}" if start_step else ""))

    stop_signal = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop_signal.append(signum))

    def save_checkpoint(step):
        model_state, optimizer_state = full_state(model, optimizers)
        if is_main:
            path = os.path.join(args.out_dir, f"checkpoint-{step}")

            def write(tmp):
                if args.lora_rank:
                    write_adapter_dir(tmp, model_state, args)  # the base is --init_from, unchanged
                else:
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

    objective = make_objective(args, raw_model, tokenizer, device)

    def validate(step):
        metrics, message = evaluate(model, val_loader, args, device, autocast, world_size, objective)
        record = {"step": step, "tokens": tokens_seen, "elapsed_s": round(elapsed(), 1), **metrics}
        if args.eval_tasks:
            scores = task_scores(model, raw_model, tokenizer, args, device, world_size, is_main)
            record.update(scores)
            message.append(", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        if message:
            logger.log(record)
            logger.write(f"step {step}: " + ", ".join(message))
        return record.get("val_loss")

    if args.mode == "dpo" and start_step == 0:
        validate(0)  # the held-out preference accuracy before any training: what DPO improves on
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
            optimizer_lr = lr_at(step, args.muon_learning_rate, max_steps, args) \
                if isinstance(optimizer, torch.optim.Muon) else lr
            for group in optimizer.param_groups:
                group["lr"] = optimizer_lr
        micro_batches = [b for b in (next(batches, None) for _ in range(args.accumulation_steps))
                         if b is not None]
        local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
        local_items = sum(objective.items(b["labels"]) for b in micro_batches)
        # One collective agrees on four things: the step's token and item counts, whether any rank ran out of
        # data, and whether any rank was asked to stop (signals reach ranks at different moments).
        step_tokens, step_items, short_ranks, stopping = all_reduce_sum(
            [local_tokens, local_items, len(micro_batches) < args.accumulation_steps, bool(stop_signal)],
            device, world_size)
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
        stat_sums = torch.zeros(len(objective.stat_names), device=device)
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
                    # DDP and FSDP average gradients over ranks, hence world_size / all items of the step.
                    loss, stats = objective(forward, input_ids, labels, step_items / world_size)
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
            if stats:
                stat_sums += torch.stack([v.float() for v in stats])
        for optimizer in optimizers:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        step_loss, *step_stats = all_reduce_sum([loss_sum.item(), *stat_sums.tolist()], device, world_size)
        step_loss /= world_size
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
                        "trainable_params": trainable,
                        **{name: round(value / step_items, 6) for name, value in zip(objective.stat_names, step_stats)},
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
    model_state = model_weights(model, raw_model, args, world_size)
    if is_main:
        save_final_model(args.out_dir, raw_model, model_state, tokenizer)
        if args.lora_rank:
            save_atomically(os.path.join(args.out_dir, ADAPTER_DIR),
                            lambda tmp: write_adapter_dir(tmp, raw_model.state_dict(), args))
    if world_size > 1:
        dist.barrier()
    logger.close()
    if is_main:
        summary = "no validation lines" if val_loss is None else f"val_loss {val_loss:.4f}" + (
            "" if args.mode == "dpo" else f" (perplexity {math.exp(val_loss):.2f})")  # DPO's is per pair
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
