#!/usr/bin/env bash
# Tiny-LLM launcher.
#   bash train.sh          the CPU demo: tokenizer -> pretraining -> SFT -> samples -> evaluation and report,
#                          in about 15 minutes
#   bash train.sh dpo      after the demo: DPO (with LoRA) of its chat model on data/dpo_poetry.jsonl.gz
#   bash train.sh rl       after the demo: a second SFT pass over its form requests, then GRPO on poem-form
#                          requests (form and rhyme rewards), then form and rhyme compliance before and after
#   bash train.sh tools    after the demo: copying drills, then SFT of its chat model on tool conversations
#                          (search_poems), then the held-out tool questions before and after
#   bash train.sh distill  after the demo: a half-size student distilled from its base model, then held-out
#                          bits per byte of teacher and student
#   bash train.sh gpu      the seed's 215M recipe (dim 1024, 18 layers, vocab 6144, seq 512) on GPUs;
#                          download seq-monkey and BelleGroup first (see README), NGPUS=8 for 8 GPUs
set -euo pipefail
cd "$(dirname "$0")"
RECIPE=${1:-demo}

# SFT of the model in $1 into $2 on the data $3 with the recipes.py run $4: the demo's chat model (demo-sft), the
# second pass at the start of `train.sh rl` (demo-sft-forms) and the tool SFT of `train.sh tools` (demo-tools).
sft_pass() {
  python train_model.py --out_dir "$2" --data_path "$3" --init_from "$1" --tokenizer_path "$1" \
    $(python recipes.py "$4") --device cpu --eval_interval 100 --save_interval 100
}

if [ "$RECIPE" = demo ]; then
  OUT=runs/demo
  echo "== 1/5 tokenizer: byte-level BPE, 6144 tokens, on the shipped poetry sample"
  python tokenizer.py --data_path data/pretrain_poetry.jsonl.gz data/sft_poetry.jsonl.gz \
    --vocab_size 6144 --out_dir $OUT/tokenizer
  echo "== 2/5 pretraining a 4.5M-parameter model with Muon (about 8 minutes on 2 CPU cores)"
  python train_model.py --out_dir $OUT/base --data_path data/pretrain_poetry.jsonl.gz \
    --tokenizer_path $OUT/tokenizer $(python recipes.py demo-pretrain) --device cpu --eval_interval 100 \
    --save_interval 100
  echo "== 3/5 a sample from the base model"
  python generate.py --model $OUT/base --prompt "《春晓》 孟浩然" --max_new_tokens 60 --seed 1
  echo "== 4/5 supervised fine-tuning for chat (about 2 minutes)"
  sft_pass $OUT/base $OUT/sft data/sft_poetry_forms.jsonl.gz demo-sft
  echo "== 5/5 chat with the fine-tuned model"
  python generate.py --model $OUT/sft --chat --prompt "请背诵孟浩然的《春晓》。" --seed 1
  python generate.py --model $OUT/sft --chat --prompt "“床前明月光”出自哪首作品？" --seed 1
  echo "== summary"
  python generate.py --model $OUT/sft --eos_check data/sft_poetry.jsonl.gz --seed 1
  python generate.py --model $OUT/sft --eos_check data/sft_poetry.jsonl.gz --temperature 0
  echo "== evaluation: the bundled poetry suite through lm-eval (base: multiple choice; chat model: all)"
  python eval.py --model $OUT/base --tasks poetry_author,poetry_next_line --device cpu --json $OUT/base/eval.json
  python eval.py --model $OUT/sft --chat --device cpu --json $OUT/sft/eval.json
  echo "== report: scores of both models, and plots of both runs in $OUT/report/"
  python report.py $OUT/base $OUT/sft --out_dir $OUT/report
  echo "models: $OUT/base (pretrained), $OUT/sft (chat); metrics: $OUT/*/metrics.jsonl"
  echo "chat yourself: python generate.py --model $OUT/sft --chat"
elif [ "$RECIPE" = dpo ]; then
  # After the demo: DPO of its chat model on the sample preference pairs, with LoRA (the reference is the
  # chat model itself with the adapters off), then the chat model's evaluation suite on the result.
  OUT=runs/demo
  python train_model.py --mode dpo --out_dir $OUT/dpo --data_path data/dpo_poetry.jsonl.gz \
    --val_data_path data/dpo_poetry_eval.jsonl.gz --init_from $OUT/sft --tokenizer_path $OUT/sft \
    $(python recipes.py demo-dpo) --device cpu --eval_interval 50 --eval_batches 50 --save_interval 50
  python eval.py --model $OUT/dpo --chat --device cpu --json $OUT/dpo/eval.json
elif [ "$RECIPE" = rl ]; then
  # After the demo: a second pass of SFT over the demo SFT's form requests (GRPO learns from a start that
  # often has the form: docs/post-training.md), GRPO of that model, then the held-out form requests, greedy
  # and sampled, before and after.
  OUT=runs/demo
  sft_pass $OUT/sft $OUT/sft_forms data/sft_poem_forms.jsonl.gz demo-sft-forms
  python train_model.py --mode grpo --out_dir $OUT/rl --data_path data/poem_form_prompts.jsonl.gz \
    --init_from $OUT/sft_forms --tokenizer_path $OUT/sft_forms $(python recipes.py demo-grpo) --device cpu \
    --save_interval 50
  for model in $OUT/sft $OUT/rl; do
    echo "== $model: the form asked for, and in rhyme, on held-out requests"
    python eval.py --model $model --chat --tasks poem_form,poem_form_sampled --device cpu --json $model/form_eval.json
  done
elif [ "$RECIPE" = tools ]; then
  # After the demo: its chat model learns to copy from its context (copying drills), then SFT on tool
  # conversations (docs/tools.md), then the held-out tool questions (by title, by a quoted line, recitation)
  # and the bundled poetry_author_chat with the tool.
  OUT=runs/demo
  python train_model.py --out_dir $OUT/copy --data_path data/copy_drills.jsonl.gz --init_from $OUT/sft \
    --tokenizer_path $OUT/sft $(python recipes.py demo-copy) --device cpu --eval_interval 50 --save_interval 50
  sft_pass $OUT/copy $OUT/tools data/sft_tools.jsonl.gz demo-tools
  for model in $OUT/sft $OUT/tools; do
    echo "== $model with search_poems"
    python eval.py --model $model --chat --tools search_poems --tasks poetry_tools,poetry_author_chat \
      --device cpu --json $model/tools_eval.json
  done
  python generate.py --model $OUT/tools --chat --tools search_poems --prompt "请背诵《静夜思》。"
elif [ "$RECIPE" = distill ]; then
  # After the demo: a student of half the demo's size learns the base model's next-token distributions
  # (docs/post-training.md); then held-out bits per byte of teacher and student.
  OUT=runs/demo
  python train_model.py --mode distill --teacher $OUT/base --out_dir $OUT/student \
    --data_path data/pretrain_poetry.jsonl.gz --tokenizer_path $OUT/base $(python recipes.py demo-distill) \
    --device cpu --eval_interval 100 --save_interval 100
  for model in $OUT/base $OUT/student; do
    echo "== $model on the held-out poems"
    python eval.py --model $model --data_path tasks/heldout_poems.jsonl.gz --device cpu
  done
elif [ "$RECIPE" = gpu ]; then
  # The seed's 215M recipe (recipes.py). One GPU: NGPUS=1. Several: torchrun starts one process per GPU.
  NGPUS=${NGPUS:-1}
  python tokenizer.py --data_path seq_monkey_datawhale.jsonl --vocab_size 6144 --out_dir custom_tokenizer
  torchrun --standalone --nproc_per_node "$NGPUS" train_model.py --out_dir base_model_215M \
    --data_path seq_monkey_datawhale.jsonl $(python recipes.py gpu-pretrain) --device cuda --dtype bfloat16 \
    --epochs 1 --accumulation_steps $((8 / NGPUS > 0 ? 8 / NGPUS : 1)) --num_workers 4 --use_swanlab
  torchrun --standalone --nproc_per_node "$NGPUS" train_model.py --out_dir sft_model_215M \
    --data_path BelleGroup_sft.jsonl --init_from base_model_215M --tokenizer_path base_model_215M \
    $(python recipes.py gpu-sft) --device cuda --dtype bfloat16 --epochs 1 --num_workers 4 --use_swanlab
  python generate.py --model sft_model_215M --chat --prompt "你好，请介绍一下你自己。"
else
  echo "usage: bash train.sh [demo|dpo|rl|tools|distill|gpu]" >&2
  exit 2
fi
