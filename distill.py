"""Distillation: --mode distill --teacher DIR. A student learns a trained teacher's whole next-token
distribution at every labelled position, not only the data's one next token.

The loss of a labelled position, with both distributions at --distill_temperature T (logits / T):
    distill_alpha * D(teacher, student) + (1 - distill_alpha) * cross-entropy(data's token)
and D, as TRL's GKDTrainer (generalized_jsd_loss) with its meaning of --distill_beta:
    beta 0: forward KL(teacher || student), the default: the student covers what the teacher considers;
    beta 1: reverse KL(student || teacher): the student stays where the teacher is confident;
    else:   the generalized Jensen-Shannon divergence beta KL(teacher || m) + (1 - beta) KL(student || m),
            m = beta teacher + (1 - beta) student.
Each term is summed over the vocabulary and averaged over the step's labelled tokens, as TRL does (no T^2
factor: --distill_alpha sets the balance). The data are pretraining text (packed blocks) or SFT
conversations (only the assistant's tokens are labelled, so only they are distilled): --distill_data, by
default the SFT rule of --mode auto (a file name with "sft").

On-policy (--distill_on_policy F, GKD's lambda): a share F of the micro-batches are completions the student
samples itself for the prompts of the data (the conversation up to its last assistant turn; rollout.py, the
sampler of --mode grpo), which the teacher scores token by token: the student learns where its own
mistakes lead, not only on the data's text. Which micro-batches are on-policy depends only on the seed and
the step, so a resumed run draws the same.

The teacher is frozen, in eval mode, never saved; --teacher_dtype may run it in half precision. It must
share the student's tokenizer (the same tokens with the same ids): its distribution is over those ids.
"""
import os
import random

import torch
import torch.nn.functional as F

from errors import Fatal
from modes import LanguageModel, frozen_copy
from rollout import sample_completions


class Distill(LanguageModel):
    """--mode distill: LanguageModel's data and validation, the teacher's distribution as the target."""
    stat_names = ("distill", "ce")

    @staticmethod
    def add_arguments(parser):
        group = parser.add_argument_group("--mode distill")
        group.add_argument("--teacher", default=None, help="the model directory to distil (same tokenizer)")
        group.add_argument("--distill_temperature", type=float, default=1.0,
                           help="both distributions at this temperature (logits / T)")
        group.add_argument("--distill_alpha", type=float, default=1.0,
                           help="weight of the divergence to the teacher; 1 - alpha weighs the data's "
                                "cross-entropy")
        group.add_argument("--distill_beta", type=float, default=0.0,
                           help="the divergence, as TRL's GKD beta: 0 forward KL, 1 reverse KL, between: "
                                "generalized JSD")
        group.add_argument("--distill_on_policy", type=float, default=0.0, metavar="F",
                           help="share of micro-batches the student samples itself (SFT data's prompts)")
        group.add_argument("--distill_data", default="auto", choices=["auto", "text", "chat"],
                           help="text: packed pretraining blocks; chat: SFT conversations; auto: chat when a "
                                "--data_path name contains 'sft'")
        group.add_argument("--teacher_dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                           help="the teacher's weights in this dtype (half the memory and time on a GPU)")

    @staticmethod
    def check_arguments(args):
        if args.teacher is None:
            raise Fatal("--mode distill needs --teacher: the trained model to distil")
        for name, low, high in (("distill_alpha", 0, 1), ("distill_beta", 0, 1), ("distill_on_policy", 0, 1)):
            if not low <= getattr(args, name) <= high:
                raise Fatal(f"--{name} must be in [{low}, {high}], got {getattr(args, name)}")
        if args.distill_temperature <= 0:
            raise Fatal(f"--distill_temperature must be positive, got {args.distill_temperature}")

    @staticmethod
    def on_conversations(run):
        choice = run.args.distill_data
        if choice == "auto":
            return any("sft" in path.lower().rsplit("/", 1)[-1] for path in run.args.data_path)
        return choice == "chat"

    def __init__(self, run, model, start_sample=0):
        super().__init__(run, model, start_sample)
        args = self.args
        if args.distill_on_policy and not self.sft:
            raise Fatal("--distill_on_policy samples answers to the prompts of SFT conversations; pass "
                        "--distill_data chat with conversations, or leave it at 0 for text")
        self.teacher = load_teacher(args.teacher, run.tokenizer, model.config.vocab_size, run.device,
                                    getattr(torch, args.teacher_dtype))
        tokenizer = run.tokenizer
        self.stop_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")]

    def step_batches(self, step):
        batches = super().step_batches(step)
        share = self.args.distill_on_policy
        if share and len(batches) == self.args.accumulation_steps:
            draws = random.Random(f"{self.args.seed} {step} {self.run.rank}")
            batches = [self.on_policy(batch) if draws.random() < share else batch for batch in batches]
        return batches

    def on_policy(self, batch):
        """The batch's conversations up to their last answer, answered by the student (one sample each). A
        batch with a conversation whose answer was truncated away stays as it is: it has no prompt to answer."""
        starts = [last_answer_start(labels) for labels in batch["labels"]]
        if None in starts:
            return batch
        room = self.args.max_seq_len - self.args.max_new_tokens  # a long prompt keeps its end
        prompts = [ids[:start].tolist()[-room:] for ids, start in zip(batch["input_ids"], starts)]
        rollouts = sample_completions(self.model, prompts, 1, self.args, self.run.tokenizer, self.stop_ids,
                                      self.run.autocast)
        return rollouts.training_rows(self.run.tokenizer.pad_token_id)

    def loss(self, model, batch, num_items):
        input_ids, labels = batch["input_ids"], batch["labels"]
        scored = predicting(labels)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids, logits_at=scored).logits
        targets = labels[:, 1:][labels[:, 1:] != -100]
        return distillation_loss(model(input_ids, logits_at=scored).logits, teacher_logits, targets, num_items,
                                 self.args)


def last_answer_start(labels):
    """The position where the last labelled span (the last assistant answer) begins; None without one."""
    labelled = (labels != -100).tolist()
    if not any(labelled):
        return None
    start = max(i for i, flag in enumerate(labelled) if flag)
    while start > 0 and labelled[start - 1]:
        start -= 1
    return start


def divergence(student_logits, teacher_logits, beta, temperature):
    """Per position, summed over the vocabulary: TRL's generalized JSD at beta (0: forward KL, 1: reverse)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        return F.kl_div(student, teacher, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(teacher, student, reduction="none", log_target=True).sum(-1)
    beta = torch.tensor(beta, dtype=student.dtype, device=student.device)
    mixture = torch.logsumexp(torch.stack([student + torch.log1p(-beta), teacher + torch.log(beta)]), dim=0)
    return (beta * F.kl_div(mixture, teacher, reduction="none", log_target=True)
            + (1 - beta) * F.kl_div(mixture, student, reduction="none", log_target=True)).sum(-1)


def predicting(labels):
    """The positions whose next token is labelled (batch, seq): where the loss reads the logits."""
    return F.pad(labels[:, 1:] != -100, (0, 1), value=False)


def distillation_loss(student_logits, teacher_logits, targets, num_items, args):
    """(the mix / num_items, [the divergence's sum, the cross-entropy's sum]) of the positions whose
    logits are given (positions, vocab) and whose next tokens are `targets` (positions,)."""
    distill = divergence(student_logits, teacher_logits, args.distill_beta, args.distill_temperature).sum()
    ce = F.cross_entropy(student_logits.float(), targets, reduction="sum")
    loss = (args.distill_alpha * distill + (1 - args.distill_alpha) * ce) / num_items
    return loss, [distill.detach(), ce.detach()]


def load_teacher(teacher_dir, tokenizer, vocab_size, device, dtype):
    """The frozen teacher, after checking that it speaks the student's tokens."""
    from transformers import AutoTokenizer
    if not os.path.isfile(os.path.join(teacher_dir, "model.safetensors")):
        raise Fatal(f"--teacher {teacher_dir} holds no model.safetensors; pass a directory written by "
                    "train_model.py")
    theirs = AutoTokenizer.from_pretrained(teacher_dir)
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise Fatal(f"--teacher {teacher_dir} has another tokenizer than the student's "
                    f"({tokenizer.name_or_path}): distillation compares distributions over the same token ids; "
                    "distil into a student made with the teacher's tokenizer")
    teacher = frozen_copy(teacher_dir, device).to(dtype)
    if teacher.config.vocab_size != vocab_size:
        raise Fatal(f"--teacher {teacher_dir} predicts {teacher.config.vocab_size} tokens, the student "
                    f"{vocab_size}; both must use the same tokenizer")
    return teacher
