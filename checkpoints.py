"""Checkpoints: complete Hugging Face model directories (or, with LoRA, adapter directories) plus the
training state (optimizer, step, data position, RNG-free counters), written so that a crash at any moment
leaves either the old checkpoint or the new one, never half of one.

A save writes into a temporary directory, fsyncs it and renames it into place (save_atomically); deleting
an old checkpoint renames it first, so a half-deleted directory never looks like a checkpoint; a new run
removes the debris of one killed while saving (remove_debris). Under DDP and FSDP the model and optimizer
states are gathered whole onto rank 0, which alone writes: a checkpoint resumes on any number of processes.
"""
import os
import shlex
import shutil
import sys

import torch

from errors import Fatal
from lora import ADAPTER_WEIGHTS, merged_state_dict, write_adapter_dir

STATE_FILE = "training_state.pt"


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


def checkpoint_to_resume(resume, out_dir, announce=True):
    """(directory, training state) of the checkpoint --resume names, or (None, None). 'auto': the newest
    complete checkpoint in out_dir, if any."""
    if resume == "auto":
        checkpoints = list_checkpoints(out_dir)
        resume = checkpoints[-1] if checkpoints else None
        if announce:
            print(f"resuming from {resume}" if resume else f"no checkpoint in {out_dir}; starting from scratch")
    if resume is None:
        return None, None
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise Fatal(f"{resume} is not a checkpoint (no {STATE_FILE}); pass a checkpoint-N directory")
    return resume, torch.load(os.path.join(resume, STATE_FILE), weights_only=False)


def save_checkpoint(run, step, model, parallel, optimizers, training_state):
    """out_dir/checkpoint-{step}: the model (LoRA: the adapters) and `training_state` with the optimizers'
    state; then only the newest --save_total_limit checkpoints are kept. Every rank takes part (the states
    are gathered); rank 0 writes. Returns the checkpoint's path."""
    args = run.args
    model_state, optimizer_state = full_state(parallel, optimizers)
    path = os.path.join(args.out_dir, f"checkpoint-{step}")
    if run.is_main:
        def write(tmp):
            if args.lora_rank:
                write_adapter_dir(tmp, model_state, args)  # the base is --init_from, unchanged
            else:
                write_model_dir(tmp, model, model_state, run.tokenizer)
            torch.save({**training_state, "optimizer": optimizer_state}, os.path.join(tmp, STATE_FILE))
        save_atomically(path, write)
        for old in list_checkpoints(args.out_dir)[:-args.save_total_limit]:
            # Rename first: a half-deleted directory must not look like a checkpoint.
            doomed = f"{old}.deleting{os.getpid()}"
            os.rename(old, doomed)
            shutil.rmtree(doomed)
    if run.world_size > 1:
        torch.distributed.barrier()  # nobody reads or resumes from a checkpoint that is still being written
    return path


def model_weights(parallel, model, lora_rank, world_size):
    """The state dict of the model as an ordinary checkpoint: gathered from DDP or FSDP, adapters merged."""
    if lora_rank:
        return merged_state_dict(model)  # DDP holds the whole model on every rank; FSDP is refused
    return full_model_state(parallel) if world_size > 1 else model.state_dict()


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
