"""RL with verifiable rewards: GRPO (Shao et al. 2024, "DeepSeekMath"), as --mode grpo of the one loop.

A step: the step's prompts (--batch_size x --accumulation_steps per process) are each answered
--num_generations times by the model as it is now (rollout.py), the reward functions (rewards.py) score
every completion, and each completion's advantage is its reward minus its group's mean (the group: the
completions of one prompt), divided by the group's standard deviation unless --scale_rewards none. The
loss is PPO's clipped surrogate on each completion token, with the ratio of the policy now to the policy
that sampled (1 until a batch of rollouts is reused: --num_iterations, which is when the clip acts):
    per token:  -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A)  [+ beta * KL to the reference]
with the KL estimate exp(ref - logp) - (ref - logp) - 1 against the --init_from model (with LoRA: the model
with its adapters off). --loss_type says what the sum is divided by, as TRL's GRPOTrainer does:
    grpo:    each completion's mean over its tokens, averaged over the completions;
    dr_grpo: the sum over all tokens / (completions x --max_new_tokens) (Liu et al. 2025, "Dr. GRPO");
    dapo:    the sum over all tokens / all completion tokens of the step (Yu et al. 2025, "DAPO").
dapo is the default, as TRL's: every token weighs the same, so a long answer is not worth less per
token, and the division does not depend on --max_new_tokens.

Groups never straddle processes: a process samples every completion of its own prompts. The rollouts
run without gradients on the unwrapped model; only the update goes through DDP.
"""
import math
import time

import torch

from dataset import PromptDataset, collate_prompts
from errors import Fatal
from modes import DatasetMode, all_reduce_sum, labelled_log_probs, make_reference, per_token_log_probs
from rewards import load_reward, score
from rollout import sample_completions, sample_with_tools
from tools import BUILT_IN, tool_schemas

LOSS_TYPES = ("dapo", "grpo", "dr_grpo")


class GRPO(DatasetMode):
    """--mode grpo: prompts in, completions sampled and scored, the clipped policy-gradient loss."""
    dataset_class, collate_fn = PromptDataset, staticmethod(collate_prompts)
    stat_names = ("clipped_tokens", "kl", "completion_tokens")
    evaluate_first = True  # the held-out reward before any update: what RL improves on

    @staticmethod
    def add_arguments(parser):
        group = parser.add_argument_group("--mode grpo")
        group.add_argument("--reward", default=None,
                           help="comma-separated reward functions: built-in names (poem_form, poem_rhyme, "
                                "answer_match) or FILE.py:FUNCTION, called as TRL's GRPOTrainer calls them")
        group.add_argument("--reward_weights", default=None,
                           help="comma-separated weights of the --reward functions (default: 1 each)")
        group.add_argument("--num_generations", type=int, default=8, help="completions sampled per prompt")
        group.add_argument("--scale_rewards", default="group", choices=["group", "none"],
                           help="divide the advantages by their group's standard deviation, or not")
        group.add_argument("--loss_type", default="dapo", choices=LOSS_TYPES,
                           help="what the summed token losses are divided by (see grpo.py)")
        group.add_argument("--epsilon", type=float, default=0.2, help="the clip: the ratio stays within 1 +- epsilon")
        group.add_argument("--epsilon_high", type=float, default=None,
                           help="the clip's upper side (DAPO's clip-higher: 0.28); default --epsilon")
        group.add_argument("--num_iterations", type=int, default=1,
                           help="updates from each batch of rollouts (the clip acts from the second)")
        group.add_argument("--beta", type=float, default=0.0,
                           help="weight of the KL penalty to the --init_from model; 0: none, no reference kept")

    @staticmethod
    def check_arguments(args):
        if args.init_from is None:
            raise Fatal("--mode grpo needs --init_from: the model to improve (a chat model for chat prompts)")
        if not args.reward:
            raise Fatal("--mode grpo needs --reward: built-in names (poem_form, poem_rhyme, answer_match) or "
                        "FILE.py:FUNCTION")
        if args.num_generations < 2:
            raise Fatal(f"--num_generations must be at least 2 (a group's mean is the baseline), got "
                        f"{args.num_generations}")
        if args.num_iterations < 1 or not 0 < args.max_new_tokens < args.max_seq_len:
            raise Fatal("--num_iterations must be positive and --max_new_tokens between 1 and --max_seq_len - 1")
        if args.fsdp:
            raise Fatal("--mode grpo does not work with --fsdp: the rollouts decode with the whole model; use DDP")
        unknown = [name for name in (args.tools or "").split(",") if name and name not in BUILT_IN]
        if unknown:
            raise Fatal(f"--tools: no built-in tool {', '.join(unknown)}; there is {', '.join(BUILT_IN)}")

    def __init__(self, run, model, start_sample=0):
        self.room = run.args.max_new_tokens
        super().__init__(run, model, start_sample)
        args = self.args
        self.rewards = [load_reward(spec.strip()) for spec in args.reward.split(",") if spec.strip()]
        weights = args.reward_weights.split(",") if args.reward_weights else ["1"] * len(self.rewards)
        if len(weights) != len(self.rewards):
            raise Fatal(f"--reward_weights gives {len(weights)} weights for {len(self.rewards)} reward functions")
        self.weights = torch.tensor([float(w) for w in weights])
        self.epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
        self.reference = make_reference(args, model, run.device) if args.beta else None
        tokenizer = run.tokenizer
        self.stop_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")]
        self.buffer, self.uses = [], 0  # the last rollouts, and how many updates they have served
        self.step = run.state["step"] if run.state is not None else 0  # the last step sampled for
        self.samples_taken, self.rollout_metrics = 0, {"rollout_s": 0.0}

    def make_loader(self, split, start_sample=0):
        tools = tool_schemas(self.args.tools.split(",")) if self.args.tools else None
        return super().make_loader(split, start_sample, room=self.room, tools=tools)

    def samples_per_epoch(self):
        # A batch of prompts serves --num_iterations steps: in steps, an epoch is that many times longer.
        prompts, exact = super().samples_per_epoch()
        return prompts * self.args.num_iterations, exact

    # --- a step's micro-batches: rollouts, scored -------------------------------------------------------

    def step_batches(self, step):
        if self.buffer and self.uses < self.args.num_iterations:
            self.uses += 1
            self.samples_taken = 0
            return self.buffer
        prompt_batches = [b for b in (next(self.batches, None) for _ in range(self.args.accumulation_steps))
                          if b is not None]
        self.samples_taken = self.samples_per_step
        if len(prompt_batches) < self.args.accumulation_steps:
            return prompt_batches  # the data is used up: the loop stops
        start, totals = time.perf_counter(), RolloutTotals(len(self.rewards))
        self.step = step + 1  # the step these rollouts train
        self.buffer = [self.rollout(prompts, totals, f"step {self.step}") for prompts in prompt_batches]
        self.uses = 1
        metrics, sums = totals.metrics(self)
        completions = max(sums["completions"], 1)
        self.rollout_metrics = {
            **metrics, "frac_reward_zero_std": round(sums["flat_groups"] / max(sums["groups"], 1), 6),
            "completion_length": round(sums["tokens"] / completions, 2),
            "truncated": round(sums["truncated"] / completions, 6), "rollout_s": round(time.perf_counter() - start, 3)}
        return self.buffer

    def rollout(self, prompts, totals, where):
        """A micro-batch of training rows from the completions of these prompts (one prompt's group each)."""
        args, n = self.args, self.args.num_generations
        rollouts = self.sample([p["prompt_ids"] for p in prompts], n)
        rewards, table = self.score(prompts, rollouts, n, where)
        advantages = group_advantages(rewards, n, args.scale_rewards)
        batch = rollouts.training_rows(self.run.tokenizer.pad_token_id)
        batch["advantages"] = advantages
        with torch.no_grad(), self.run.autocast:
            device = self.run.device
            input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            if args.num_iterations > 1:  # the sampling policy's log-probabilities, for the ratio
                batch["old_log_probs"] = labelled_log_probs(self.model, input_ids, labels).cpu()
            if self.reference is not None:
                batch["reference_log_probs"] = per_token_log_probs(self.reference(input_ids), labels).cpu()
        totals.add(table, rewards, n, rollouts)
        return batch

    def sample(self, prompt_ids, n, greedy=False):
        """n completions of each prompt by the model as it is now, calling --tools if given."""
        args, tokenizer = self.args, self.run.tokenizer
        if args.tools:
            return sample_with_tools(self.model, prompt_ids, n, args, tokenizer, self.stop_ids, self.run.autocast,
                                     set(args.tools.split(",")), greedy)
        return sample_completions(self.model, prompt_ids, n, args, tokenizer, self.stop_ids, self.run.autocast,
                                  greedy)

    def score(self, prompts, rollouts, n, where):
        """(the weighted reward of each completion, the table [completions, functions] of each function's),
        the functions called as TRL calls them. NaN where a function returned None; a completion that no
        function scored has no reward (NaN), no part in its group's baseline, and no advantage."""
        conversational = not isinstance(prompts[0]["prompt"], str)
        completions = [[{"role": "assistant", "content": text}] if conversational else text
                       for text in rollouts.texts]
        names = sorted({name for p in prompts for name in p["columns"]})
        columns = {name: [p["columns"].get(name) for p in prompts for _ in range(n)] for name in names}
        prompt_of = [p["prompt"] for p in prompts for _ in range(n)]
        table = torch.tensor(score(self.rewards, where, prompt_of, completions, rollouts.completion_ids, columns))
        rewards = (torch.nan_to_num(table) * self.weights).sum(1)
        rewards[torch.isnan(table).all(1)] = math.nan
        return rewards, table

    # --- the loss -------------------------------------------------------------------------------------------

    def count(self, batch):
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        completions = batch["labels"].shape[0]
        items = {"dapo": tokens, "grpo": completions, "dr_grpo": completions * self.args.max_new_tokens}
        return tokens, items[self.args.loss_type]

    def loss(self, model, batch, num_items):
        log_probs = labelled_log_probs(model, batch["input_ids"], batch["labels"])
        return grpo_loss(log_probs, batch, num_items, self.args.loss_type, self.args.epsilon, self.epsilon_high,
                         self.args.beta)

    def samples_drawn(self):
        return self.samples_taken

    def step_metrics(self, stats, items, seconds):
        clipped, kl, tokens = stats
        metrics = {**self.rollout_metrics, "clip_fraction": round(clipped / max(tokens, 1), 6)}
        if self.reference is not None:
            metrics["kl"] = round(kl / max(tokens, 1), 6)
        metrics["update_s"] = round(seconds - self.rollout_metrics.get("rollout_s", 0), 3)
        self.rollout_metrics = {"rollout_s": 0.0}  # a step reusing rollouts samples none
        return metrics

    # --- held-out reward --------------------------------------------------------------------------------------

    def validate(self, model):
        """The mean reward (and each function's) of greedy answers to the held-out prompts."""
        totals = RolloutTotals(len(self.rewards))
        batches = iter(self.val_loader)
        for _ in range(self.args.eval_batches):
            prompts = next(batches, None)
            if prompts is None:
                break
            rollouts = self.sample([p["prompt_ids"] for p in prompts], 1, greedy=True)
            rewards, table = self.score(prompts, rollouts, 1, f"step {self.step} (evaluation)")
            totals.add(table, rewards, 1, rollouts)
        metrics, _ = totals.metrics(self, prefix="val_")
        metrics.pop("val_reward_std", None)
        return metrics, [f"{name} {value:.4f}" for name, value in metrics.items()]

    # --- resume ------------------------------------------------------------------------------------------------

    def state_dict(self):
        """The rollouts still to be reused (--num_iterations > 1): a resumed run updates from the same ones."""
        return {"buffer": self.buffer, "uses": self.uses}

    def load_state_dict(self, state):
        self.buffer, self.uses = state.get("buffer", []), state.get("uses", 0)


def grpo_loss(log_probs, batch, num_items, loss_type, epsilon, epsilon_high, beta):
    """The clipped surrogate of a micro-batch of rollouts (the module docstring's formula): (the sum of
    its items' losses / num_items, [clipped tokens, summed KL, completion tokens]). log_probs: the policy's
    per-token log-probabilities (per_token_log_probs); batch: labels, advantages, and where they apply the
    sampling policy's (old_log_probs) and the reference's (reference_log_probs) log-probabilities."""
    mask = (batch["labels"][:, 1:] != -100).float()
    old = batch.get("old_log_probs", log_probs.detach())
    advantages = batch["advantages"][:, None]
    ratio = torch.exp(log_probs - old)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    kl = torch.zeros_like(per_token)
    if beta:
        delta = batch["reference_log_probs"] - log_probs
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    if loss_type == "grpo":  # each completion's mean over its tokens
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / num_items
    else:
        loss = (per_token * mask).sum() / num_items
    # Clipped: a token whose ratio the clip holds where it would have pushed further.
    was_clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    return loss, [(was_clipped * mask).sum(), (kl * mask).sum().detach(), mask.sum()]


def group_advantages(rewards, n, scale):
    """Each reward minus its group's mean (groups: n consecutive completions), over the group's standard
    deviation (Bessel-corrected, + 1e-4) unless scale is "none"; 0 for a completion no function scored."""
    grouped = rewards.view(-1, n)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    advantages = grouped - mean
    if scale != "none":
        count = (~torch.isnan(grouped)).sum(1, keepdim=True)
        variance = torch.nanmean((grouped - mean) ** 2, dim=1, keepdim=True) * count / (count - 1).clamp(min=1)
        advantages = advantages / (variance.sqrt() + 1e-4)
    return torch.nan_to_num(advantages.flatten(), nan=0.0)


class RolloutTotals:
    """Sums over rollouts, for the log: the completions scored, their rewards and squares, the groups and
    those whose rewards are all equal (no signal), each function's sum and count, lengths, truncations."""
    FIELDS = ("scored", "reward", "squares", "groups", "flat_groups", "completions", "tokens", "truncated")

    def __init__(self, functions):
        self.totals = dict.fromkeys(self.FIELDS, 0.0)
        self.function_sums, self.function_counts = [0.0] * functions, [0.0] * functions

    def add(self, table, rewards, n, rollouts):
        scored = rewards[~torch.isnan(rewards)]
        groups = rewards.view(-1, n)
        for name, value in (("scored", len(scored)), ("reward", float(scored.sum())),
                            ("squares", float((scored ** 2).sum())), ("groups", len(groups)),
                            ("flat_groups", int((groups.amax(1) == groups.amin(1)).sum())),
                            ("completions", len(rollouts.completion_ids)),
                            ("tokens", sum(len(c) for c in rollouts.completion_ids)),
                            ("truncated", sum(rollouts.truncated))):
            self.totals[name] += value
        for f in range(table.shape[1]):
            column = table[:, f][~torch.isnan(table[:, f])]
            self.function_sums[f] += float(column.sum())
            self.function_counts[f] += len(column)

    def summed(self, run):
        """(totals, function sums, function counts), each summed over all processes."""
        values = all_reduce_sum([*self.totals.values(), *self.function_sums, *self.function_counts], run.device,
                                run.world_size)
        functions = len(self.function_sums)
        totals = dict(zip(self.FIELDS, values))
        return totals, values[len(self.FIELDS):-functions], values[-functions:]

    def metrics(self, mode, prefix=""):
        """{name: value} of the rewards: mean, std (Bessel), each function's mean; empty when none scored."""
        totals, sums, counts = self.summed(mode.run)
        if not totals["scored"]:
            return {}, totals
        n = totals["scored"]
        mean = totals["reward"] / n
        variance = max(totals["squares"] / n - mean ** 2, 0.0) * n / max(n - 1, 1)
        metrics = {f"{prefix}reward": round(mean, 6), f"{prefix}reward_std": round(math.sqrt(variance), 6)}
        for (name, _), total, count in zip(mode.rewards, sums, counts):
            metrics[f"{prefix}rewards/{name}"] = round(total / max(count, 1), 6)
        return metrics, totals
