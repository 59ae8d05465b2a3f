"""Training modes: what the one loop in train_model.train() trains on and what it minimises.

The loop knows a mode only through this interface (class Mode):

    batches = mode.step_batches(step)              the micro-batches of the next optimizer step
    tokens, items = mode.count(batch)              its labelled tokens, and the items the loss averages over
    loss, stats = mode.loss(model, batch, items)   the loss of one micro-batch: its share of the step's
    metrics = mode.step_metrics(stats, items, s)   what the log records of the step besides its loss
    record, message = mode.validate(model)         held-out metrics, at each evaluation

and gives every mode gradient accumulation, DDP and FSDP, LoRA, mixed precision, exact resume, stop
signals, bad-input handling, logging and evaluation. To add a mode: subclass Mode, name it, add its options
(add_arguments, check_arguments), implement the four methods (and state_dict/load_state_dict if it keeps
state of its own between steps), and list it in train_model.MODES.

Here: LanguageModel (pretraining and SFT: cross-entropy of the labelled tokens) and DPO (preference pairs
against a frozen reference); grpo.py holds GRPO, distill.py Distill.
"""
import math
import signal
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dataset import (PreferenceDataset, PretrainDataset, SFTDataset, collate, collate_preferences,
                     estimate_samples_per_epoch)
from errors import Fatal, Stopped
from lora import adapters_disabled
from token_cache import build_token_cache


class Mode:
    """A training method, as the loop sees it. A step weighs every item of it equally (a labelled token, a
    pair...), whatever micro-batch or rank holds it: the loop passes each micro-batch's loss the number of
    items of the whole step, summed over ranks and divided by the number of ranks (DDP averages gradients)."""
    stat_names = ()  # statistics of a step besides its loss, each summed over the step's items
    evaluate_first = False  # validate before the first step too

    @staticmethod
    def add_arguments(parser):
        """The mode's own command-line options."""

    @staticmethod
    def check_arguments(args):
        """Fatal for options the mode cannot run with, before anything is loaded."""

    def __init__(self, run, model):
        """run: the run's arguments and place (train_model.Run); model: the Transformer being trained (LoRA
        layers included), unwrapped: what generates and what a reference is made from."""
        self.run, self.args, self.model = run, run.args, model
        self.samples_per_step = self.args.batch_size * self.args.accumulation_steps * run.world_size

    def step_batches(self, step):
        """The micro-batches (dicts of tensors) of the step after `step`, accumulation_steps of them; fewer
        when the data is used up, which ends the run."""
        raise NotImplementedError

    def samples_drawn(self):
        """Samples of the data the last step_batches took, on all processes: where a resumed run starts."""
        return self.samples_per_step

    def count(self, batch):
        """(labelled tokens, items) of a micro-batch: tokens measure throughput, items weigh the loss."""
        raise NotImplementedError

    def loss(self, model, batch, num_items):
        """(loss, stats) of a micro-batch through `model` (the model as it trains: DDP, compiled...): the
        sum over its items divided by num_items, and the sums of stat_names over its items."""
        raise NotImplementedError

    def step_metrics(self, stats, items, seconds):
        """{name: value} the log records of a step besides its loss: by default each of stat_names per item.
        stats: their sums over the step (all micro-batches and processes); seconds: the step's time."""
        return {name: round(value / items, 6) for name, value in zip(self.stat_names, stats)}

    def validate(self, model):
        """(record, message parts) of held-out metrics, the same on every rank; ({}, []) when there is no
        held-out data."""
        raise NotImplementedError

    def samples_per_epoch(self):
        """(samples in one pass over the training data, exact?): sets the schedule's length."""
        raise NotImplementedError

    def state_dict(self):
        """What the mode must keep across a resume, besides the data position (the loop keeps that)."""
        return {}

    def load_state_dict(self, state):
        pass


def all_reduce_sum(values, device, world_size):
    """The sums of a list of numbers over the ranks, as floats (float64: token counts stay exact)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def ignore_stop_signals(worker_id):
    """DataLoader workers leave Ctrl-C and SIGTERM to the main process, which stops after the step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class DatasetMode(Mode):
    """A mode whose samples come from a dataset of dataset.py, read through a DataLoader: its training
    split from the data position the run had reached, and its validation split. `dataset_class` and
    `collate_fn` say which."""
    dataset_class = collate_fn = None

    def __init__(self, run, model, start_sample=0):
        super().__init__(run, model)
        self.train_set, train_loader = self.make_loader("train", start_sample)
        _, self.val_loader = self.make_loader("val")
        self.batches = iter(train_loader)

    def make_loader(self, split, start_sample=0, **dataset_options):
        args, run = self.args, self.run
        data_path, val_every = args.data_path, 200
        if split == "val" and args.val_data_path is not None:
            data_path, val_every = args.val_data_path, 1  # every line of these files is held out
        dataset = self.dataset_class(
            data_path, run.tokenizer, args.max_seq_len, split=split, epochs=args.epochs if split == "train" else 1,
            rank=run.rank, world_size=run.world_size, batch_size=args.batch_size, start_sample=start_sample,
            strict=args.strict, max_bad_fraction=args.max_bad_fraction, seed=args.seed, val_every=val_every,
            **dataset_options)
        loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                            collate_fn=partial(self.collate_fn, pad_id=run.tokenizer.pad_token_id),
                            pin_memory=run.device.type == "cuda", worker_init_fn=ignore_stop_signals)
        return dataset, loader

    def step_batches(self, step):
        return [b for b in (next(self.batches, None) for _ in range(self.args.accumulation_steps)) if b is not None]

    def samples_per_epoch(self):
        # Reading the first lines also checks the data file before any training.
        return estimate_samples_per_epoch(self.train_set, report=self.run.is_main), False

    def validate(self, model):
        return self.val_record(validation_sums(model, self.val_loader, self.val_sums, len(self.val_names), self.run))

    def val_sums(self, logits, input_ids, labels):
        """The held-out sums of a batch, one per val_names."""
        raise NotImplementedError

    def val_record(self, sums):
        """(record, message parts) from the sums of val_names over the held-out batches."""
        raise NotImplementedError


@torch.no_grad()
def validation_sums(model, loader, batch_sums, count, run):
    """{name: sum} over up to --eval_batches held-out batches on each rank, summed over all ranks;
    batch_sums(logits, input_ids, labels) gives a batch's `count` sums."""
    device, world_size = run.device, run.world_size
    model.eval()
    sums = torch.zeros(count, dtype=torch.float64, device=device)
    batches = iter(loader)
    for _ in range(run.args.eval_batches):
        batch = next(batches, None)
        if all_reduce_sum([batch is not None], device, world_size)[0] == 0:
            break
        with run.autocast:
            if batch is None:
                # Ranks may hold one batch more than others. Every rank must run the same number of forwards
                # (DDP broadcasts buffers, FSDP all-gathers weights), so this one runs a forward counting nothing.
                model(torch.zeros((1, 2), dtype=torch.long, device=device))
                continue
            input_ids = batch["input_ids"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            sums += torch.stack([v.double() for v in batch_sums(model(input_ids).logits, input_ids, labels)])
    model.train()
    return all_reduce_sum(sums.tolist(), device, world_size)


class LanguageModel(DatasetMode):
    """Pretraining (packed blocks of text) and SFT (conversations, labelled on the assistant's tokens):
    the cross-entropy of the labelled tokens, each token of a step weighing the same.

    Validation: loss per token, and bits per byte = nll (nats) / (ln 2 * bytes) over the predicted tokens
    that stand for text (special tokens such as <|endoftext|> and <|im_end|> have no bytes and are left out
    of both sums): a loss that does not depend on the tokenizer."""
    val_names = ("nll", "tokens", "text_nll", "text_bytes")

    def __init__(self, run, model, start_sample=0):
        self.sft = self.on_conversations(run)
        self.dataset_class, self.collate_fn = (SFTDataset if self.sft else PretrainDataset), collate
        if run.args.token_cache and not self.sft:
            prepare_token_cache(run, self)
        super().__init__(run, model, start_sample)
        self.token_bytes = token_byte_lengths(run.tokenizer).to(run.device)

    @staticmethod
    def on_conversations(run):
        """SFT conversations (labelled on the assistant's tokens), or text packed into blocks."""
        return run.mode == "sft"

    def make_loader(self, split, start_sample=0):
        if self.sft:
            return super().make_loader(split, start_sample)
        return super().make_loader(split, start_sample,
                                   token_cache=self.args.token_cache if split == "train" else None)

    def samples_per_epoch(self):
        estimate, _ = super().samples_per_epoch()  # also checks the data
        if self.sft or self.train_set.token_cache is None:
            return estimate, False
        return self.train_set.cached_blocks(), True

    def count(self, batch):
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        return tokens, tokens

    def loss(self, model, batch, num_items):
        return model(batch["input_ids"], labels=batch["labels"], num_items_in_batch=num_items).loss, []

    def val_sums(self, logits, input_ids, labels):
        targets = labels[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                              reduction="none")
        target_bytes = torch.where(targets != -100, self.token_bytes[targets.clamp(min=0)], 0).flatten()
        return [nll.sum(), (targets != -100).sum(), nll[target_bytes > 0].sum(), target_bytes.sum()]

    def val_record(self, sums):
        sums = dict(zip(self.val_names, sums))
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


def prepare_token_cache(run, mode):
    """Rank 0 tokenizes the training split into --token_cache unless it is up to date; the rest wait.
    A stop signal ends the build where it is (it continues on the next run) and the run with it."""
    if run.is_main:
        streaming = PretrainDataset(run.args.data_path, run.tokenizer, run.args.max_seq_len, strict=run.args.strict,
                                    max_bad_fraction=run.args.max_bad_fraction, seed=run.args.seed)

        def stop(signum, frame):
            raise Stopped(signum)
        handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            build_token_cache(streaming, run.args.token_cache, num_workers=run.args.num_workers)
        except Stopped:
            print(f"stopped by a signal while building {run.args.token_cache}; the next run continues it")
            raise
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    if run.world_size > 1:
        dist.barrier()


def token_byte_lengths(tokenizer):
    """UTF-8 bytes of the text each token id stands for, 0 for special tokens: the denominator of
    bits per byte.

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


def per_token_log_probs(logits, labels):
    """log p(token) at each labelled position (batch, seq - 1), 0 elsewhere; labels aligned with the inputs."""
    targets = labels[:, 1:]
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (targets != -100)


def labelled_log_probs(model, input_ids, labels):
    """per_token_log_probs of model on input_ids, the output head run only where a labelled token is next
    (an answer's positions, not its prompt's): the same values for less work."""
    targets = labels[:, 1:]
    labelled = targets != -100
    logits = model(input_ids, logits_at=F.pad(labelled, (0, 1), value=False)).logits
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[labelled].unsqueeze(-1)).squeeze(-1)
    log_probs = torch.zeros(labelled.shape, dtype=picked.dtype, device=picked.device)
    log_probs[labelled] = picked
    return log_probs


def sequence_log_probs(logits, labels):
    """log p(labelled tokens) of each row: the sum over its tokens (labels aligned with the inputs)."""
    return per_token_log_probs(logits, labels).sum(-1)


class DPO(DatasetMode):
    """Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your Language
    Model is Secretly a Reward Model"), the sigmoid loss of a pair:
        -log sigmoid(r_chosen - r_rejected),   r = beta * (log pi(answer | prompt) - log ref(answer | prompt))
    with log-probabilities summed over the answer's tokens. r is the answer's implicit reward; the pair's
    reward margin is r_chosen - r_rejected, and the reward accuracy the share of pairs where it is positive.
    Batches hold the chosen rows, then the rejected ones (dataset.collate_preferences).

    The reference is the --init_from model, frozen (make_reference). Held-out preference accuracy is the
    share of pairs where the model itself gives the chosen answer the higher log-probability: unlike the
    rewards it means something before training too, so DPO validates before its first step."""
    dataset_class, collate_fn = PreferenceDataset, staticmethod(collate_preferences)
    stat_names = ("reward_margin", "reward_accuracy")
    val_names = ("loss", "pairs", "reward_margin", "reward_accuracy", "preference_accuracy")
    evaluate_first = True

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--dpo_beta", type=float, default=0.1,
                            help="DPO: how far the model may move from the reference (higher: less far)")

    @staticmethod
    def check_arguments(args):
        if args.init_from is None:
            raise Fatal("--mode dpo needs --init_from: the model to improve, which is also the frozen reference")
        if args.dpo_beta <= 0:
            raise Fatal(f"--dpo_beta must be positive, got {args.dpo_beta}")

    def __init__(self, run, model, start_sample=0):
        super().__init__(run, model, start_sample)
        self.beta = self.args.dpo_beta
        self.reference = make_reference(self.args, model, run.device)

    def count(self, batch):
        return int((batch["labels"][:, 1:] != -100).sum()), batch["labels"].shape[0] // 2

    def _reference_log_probs(self, input_ids, labels):
        # Before the policy's forward: with LoRA the reference switches the adapters off and on again,
        # which must not happen between a forward and its backward.
        with torch.no_grad():
            return sequence_log_probs(self.reference(input_ids), labels)

    def loss(self, model, batch, num_items):
        input_ids, labels = batch["input_ids"], batch["labels"]
        reference_log_probs = self._reference_log_probs(input_ids, labels)
        return dpo_loss(model(input_ids).logits, reference_log_probs, labels, self.beta, num_items)

    def val_sums(self, logits, input_ids, labels):
        margin, preference = dpo_margins(logits, self._reference_log_probs(input_ids, labels), labels, self.beta)
        return [-F.logsigmoid(margin).sum(), margin.new_tensor(margin.numel()), margin.sum(), (margin > 0).sum(),
                (preference > 0).sum()]

    def val_record(self, sums):
        sums = dict(zip(self.val_names, sums))
        if not sums["pairs"]:
            return {}, []
        record = {f"val_{name}": round(sums[name] / sums["pairs"], 6) for name in self.val_names if name != "pairs"}
        return record, [f"{name} {value:.4f}" for name, value in record.items()]


def dpo_margins(logits, reference_log_probs, labels, beta):
    """(reward margins, log pi(chosen) - log pi(rejected)) of a preference batch's pairs: the policy's logits,
    the reference's log-probabilities of each row's answer, rows as collate_preferences orders them."""
    policy = sequence_log_probs(logits, labels)
    chosen, rejected = (beta * (policy - reference_log_probs)).chunk(2)
    policy_chosen, policy_rejected = policy.chunk(2)
    return chosen - rejected, policy_chosen - policy_rejected


def dpo_loss(logits, reference_log_probs, labels, beta, num_items):
    """DPO's loss of a preference batch (its pairs' sum over num_items) and its statistics: the sum of the
    reward margins and the number of pairs whose margin is positive."""
    margin, _ = dpo_margins(logits, reference_log_probs, labels, beta)
    return -F.logsigmoid(margin).sum() / num_items, [margin.detach().sum(), (margin > 0).sum()]


def make_reference(args, model, device):
    """The frozen --init_from model, as a function of input ids to logits (in eval mode: a reference has no
    dropout): a copy of it, or with LoRA the model itself with its adapters disabled (no second copy)."""
    if not args.lora_rank:
        frozen = frozen_copy(args.init_from, device)
        return lambda input_ids: frozen(input_ids).logits

    def reference(input_ids):
        was_training = model.training
        model.eval()
        try:
            with adapters_disabled(model):
                return model(input_ids).logits
        finally:
            model.train(was_training)
    return reference


def frozen_copy(model_dir, device):
    """The model of model_dir, frozen and in eval mode: a reference or a teacher."""
    from model import Transformer
    return Transformer.from_pretrained(model_dir, dropout=0.0).to(device).eval().requires_grad_(False)



