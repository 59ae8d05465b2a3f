"""Benchmark Tiny-LLM against its peers: the command. It parses the arguments and runs one benchmark of
benchmarks/, whose docstrings say what each measures, how, and at what cost.

    python bench.py                              the race against transformers (benchmarks/hf_race.py):
                                                 the demo model on CPU (2 to 3.5 minutes)
    python bench.py --no-compile                 without torch.compile (training step, decoding step)
    python bench.py --device cuda --config 215m  the 215M recipe's model on a GPU (bf16 autocast)
    python bench.py --quick --json               small sizes, JSON instead of the table (smoke tests)
    python bench.py --trl runs/demo/sft          our SFT, DPO and LoRA SFT steps against TRL's trainers
                                                 (benchmarks/trl_race.py)
    python bench.py --trl_grpo runs/demo/sft     our --mode grpo against TRL's GRPOTrainer (benchmarks/trl_grpo.py)
    python bench.py --serve runs/demo/sft        serve.py under load (benchmarks/serving.py)
    python bench.py --cpu_dtype --threads 2      our training step and decoding in float32 and bf16 on this CPU
                                                 (benchmarks/cpu_dtype.py)
    python bench.py --speedrun adamw-cosine,muon-wsd
                                                 two training recipes, time to quality (benchmarks/speedrun.py)

benchmarks/common.py: how the races time (alternating rounds, each contender's fastest, one torch thread
on CPU) and the table they print. The exit status is 1 when a section of the race against transformers
failed.
"""
import argparse
import sys

import torch

from benchmarks import cpu_dtype, hf_race, serving, speedrun, trl_grpo, trl_race
from benchmarks.common import use_threads
from benchmarks.hf_race import CONFIGS
from recipes import SPEEDRUN_RECIPES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--config", default="demo", choices=sorted(CONFIGS))
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time our torch.compile'd training step and decoding step (default: on, off "
                        "with --quick; compiling takes about a minute on 2 CPU cores the first time, "
                        "seconds after)")
    p.add_argument("--quick", action="store_true", help="small sizes, one or two rounds: a smoke test")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--data_path", default="data/pretrain_poetry.jsonl.gz")
    p.add_argument("--tokenizer_path", default="custom_tokenizer")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads; default 1 on CPU (see benchmarks/common.py), torch's choice on GPU")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--serve", default=None, metavar="MODEL_DIR",
                   help="instead of the sections above, measure serve.py on this model (127.0.0.1 only): time "
                        "to first token, 8 streaming clients against 1, and a mixed load of requests")
    p.add_argument("--serve_requests", type=int, default=1000, help="requests of --serve's mixed load")
    p.add_argument("--speedrun", default=None, metavar="RECIPE,RECIPE",
                   help=f"instead of the sections above, pretrain the demo model with two recipes "
                        f"({', '.join(SPEEDRUN_RECIPES)}) one after the other and compare val_bpb against wall "
                        "time (about 2 x 8 minutes on 2 idle cores; --quick: a tiny smoke run)")
    p.add_argument("--trl", nargs="?", const="", default=None, metavar="MODEL_DIR",
                   help="instead of the sections above, race our SFT, DPO and LoRA SFT steps against TRL's "
                        "SFTTrainer, DPOTrainer and SFTTrainer + PEFT on this model (without MODEL_DIR: a random "
                        "model of --config's shape)")
    p.add_argument("--speedrun_dir", default="runs/speedrun", help="where --speedrun's runs are kept")
    p.add_argument("--trl_grpo", default=None, metavar="MODEL_DIR",
                   help="instead of the sections above, race train_model.py --mode grpo against TRL's GRPOTrainer "
                        "on this chat model, end to end (the poem-form prompts and reward)")
    p.add_argument("--cpu_dtype", action="store_true",
                   help="instead of the sections above, race our training step in float32 and under bf16 "
                        "autocast, eager and compiled (the demo's and the default model), and greedy decoding, "
                        "on this CPU, with MFU against each dtype's measured matmul peak")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.serve:
        return serving.run(args)
    if args.speedrun:
        return speedrun.run(args)
    if args.cpu_dtype:
        return cpu_dtype.run(args)
    if args.trl_grpo:
        return trl_grpo.run(args)
    if args.compile is None:
        args.compile = not args.quick
    device = torch.device(args.device)
    use_threads(device, args.threads)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # stdout/stderr stay readable (and --json stays pure)
    hf_logging.set_verbosity_error()
    if args.trl is not None:
        return trl_race.run(args, device)
    return hf_race.run(args, device)


if __name__ == "__main__":
    sys.exit(1 if main().get("errors") else 0)
