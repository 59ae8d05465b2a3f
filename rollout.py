"""Rollouts: completions that the model being trained samples for a batch of prompts, for the modes that
learn from their own samples (--mode grpo; on-policy distillation).

The prompts, each repeated n times, are right-padded into one batch and sampled together by
Transformer.sample (the KV cache; each row continues at its own position), without gradients, in eval mode
and under the run's autocast. A completion ends with its first stop token (<|im_end|> or <|endoftext|>),
which it keeps: the model learns to end its answers. One that reaches --max_new_tokens without it is
truncated. For training, each completion becomes a row of prompt + completion labelled on the completion
only, so that the loss code of SFT reads it: the same `labels` convention (-100: no loss).

With tools (--tools), a completion that ends in a call goes on: the call runs, its result is appended in
the chat template's tool turn, and the model samples its next turn, up to --max_tool_calls times. The
completion is then the model's turns with the tool turns between them; only the model's tokens are
labelled, so the loss never trains the model to write a tool's results.
"""
from dataclasses import dataclass

import torch

from dataset import collate
from tools import MAX_TOOL_CALLS, parse_tool_calls, run_tool


def add_arguments(parser):
    group = parser.add_argument_group("rollouts (--mode grpo, and distillation's on-policy share)")
    group.add_argument("--max_new_tokens", type=int, default=128, help="the longest completion sampled")
    group.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    group.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling of the rollouts; 1: off")
    group.add_argument("--tools", default=None, metavar="NAMES",
                       help="built-in tools (search_poems) the model may call during rollouts: calls run, their "
                            "results join the completion (not trained on)")
    group.add_argument("--max_tool_calls", type=int, default=MAX_TOOL_CALLS, help="tool calls per rollout at most")


@dataclass
class Rollouts:
    """Completions of a batch of prompts, n per prompt, in prompt order (prompt i's are rows i*n..i*n+n-1)."""
    prompt_ids: list  # [ids] of each completion's prompt
    completion_ids: list  # [ids], the stop token included when there is one
    truncated: list  # [bool]: reached max_new_tokens without a stop token
    texts: list  # [str]: the completions decoded, special tokens left out (with tools: the last turn's)
    sampled: list | None = None  # with tools: [bool per completion token]: the model's (not a tool turn's)

    def training_rows(self, pad_id):
        """{"input_ids", "labels"}: prompt + completion per row, right-padded, labelled on the tokens of the
        completion the model sampled."""
        rows = []
        for i, (prompt, completion) in enumerate(zip(self.prompt_ids, self.completion_ids)):
            ids = torch.tensor(prompt + completion)
            labels = torch.full_like(ids, -100)
            labels[len(prompt):] = ids[len(prompt):]
            if self.sampled is not None:
                labels[len(prompt):][~torch.tensor(self.sampled[i], dtype=torch.bool)] = -100
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



@torch.no_grad()
def sample_with_tools(model, prompts, n, args, tokenizer, stop_ids, autocast, tool_names, greedy=False):
    """sample_completions, where a turn that calls one of tool_names goes on after the call's result (see
    the module docstring). Rows that called sample their next turn together; the others are done."""
    first = sample_completions(model, prompts, n, args, tokenizer, stop_ids, autocast, greedy)
    completions = [list(c) for c in first.completion_ids]
    sampled = [[True] * len(c) for c in completions]
    truncated, texts = list(first.truncated), list(first.texts)
    for _ in range(args.max_tool_calls):
        calling = []
        for row, text in enumerate(texts):
            _, calls, malformed = parse_tool_calls(text, tool_names) if not truncated[row] else ("", [], True)
            if calls and not malformed:
                results = [{"role": "tool", "content": run_tool(c["name"], c["arguments"])} for c in calls]
                turn = tokenizer("\n" + tokenizer.apply_chat_template(results, add_generation_prompt=True,
                                                                        tokenize=False),
                                 add_special_tokens=False)["input_ids"]
                completions[row] += turn
                sampled[row] += [False] * len(turn)
                calling.append(row)
        room = [row for row in calling if len(first.prompt_ids[row]) + len(completions[row]) + 1 <
                model.config.max_seq_len]
        if not room:
            break
        more = sample_completions(model, [first.prompt_ids[row] + completions[row] for row in room], 1, args,
                                  tokenizer, stop_ids, autocast, greedy)
        for row, ids, cut, text in zip(room, more.completion_ids, more.truncated, more.texts):
            completions[row] += ids
            sampled[row] += [True] * len(ids)
            truncated[row], texts[row] = cut, text
    return Rollouts(first.prompt_ids, completions, truncated, texts, sampled)
