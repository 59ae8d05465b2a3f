"""Rollouts: completions that the model being trained samples for a batch of prompts, for the modes that
learn from their own samples (--mode grpo; on-policy distillation).

The prompts, each repeated n times, are right-padded into one batch and sampled together by
Transformer.sample (the KV cache; each row continues at its own position), without gradients, in eval mode
and under the run's autocast. A completion ends with its first stop token (<|im_end|> or <|endoftext|>),
which it keeps: the model learns to end its answers. One that reaches --max_new_tokens without it is
truncated. For training, each completion becomes a row of prompt + completion labelled on the completion
only, so that the loss code of SFT reads it: the same `labels` convention (-100: no loss).
"""
from dataclasses import dataclass

import torch

from dataset import collate


def add_arguments(parser):
    group = parser.add_argument_group("rollouts (--mode grpo, and distillation's on-policy share)")
    group.add_argument("--max_new_tokens", type=int, default=128, help="the longest completion sampled")
    group.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    group.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling of the rollouts; 1: off")


@dataclass
class Rollouts:
    """Completions of a batch of prompts, n per prompt, in prompt order (prompt i's are rows i*n..i*n+n-1)."""
    prompt_ids: list  # [ids] of each completion's prompt
    completion_ids: list  # [ids], the stop token included when there is one
    truncated: list  # [bool]: reached max_new_tokens without a stop token
    texts: list  # [str]: the completions decoded, special tokens left out

    def training_rows(self, pad_id):
        """{"input_ids", "labels"}: prompt + completion per row, right-padded, labelled on the completion."""
        rows = []
        for prompt, completion in zip(self.prompt_ids, self.completion_ids):
            ids = torch.tensor(prompt + completion)
            labels = torch.full_like(ids, -100)
            labels[len(prompt):] = ids[len(prompt):]
            rows.append({"input_ids": ids, "labels": labels})
        return collate(rows, pad_id)


@torch.no_grad()
def sample_completions(model, prompts, n, args, tokenizer, stop_ids, autocast, greedy=False):
    """Rollouts of `prompts` (lists of token ids), n completions each, sampled with the rollout options
    of args (or greedily). Rows are sampled in one batch: the prompts right-padded, with their lengths."""
    device = next(model.parameters()).device
    repeated = [prompt for prompt in prompts for _ in range(n)]
    lengths = torch.tensor([len(p) for p in repeated], device=device)
    input_ids = torch.full((len(repeated), int(lengths.max())), tokenizer.pad_token_id, dtype=torch.long,
                           device=device)
    for row, prompt in enumerate(repeated):
        input_ids[row, :len(prompt)] = torch.tensor(prompt)
    with autocast:
        new = model.sample(input_ids, args.max_new_tokens, temperature=0 if greedy else args.temperature,
                           top_p=None if greedy else args.top_p, eos_token_id=stop_ids,
                           prompt_lengths=lengths).tolist()
    completions, truncated = [], []
    for row in new:
        end = next((i for i, token in enumerate(row) if token in stop_ids), None)
        completions.append(row if end is None else row[:end + 1])
        truncated.append(end is None)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return Rollouts(repeated, completions, truncated, texts)

