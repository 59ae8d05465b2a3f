"""A LLaMA2-style decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Read top to bottom: the config; the building blocks; the Transformer, whose `forward` trains and scores,
`decode` and `generate` sample, and `save_pretrained`/`from_pretrained` write and read Hugging Face's Llama
layout, so that `transformers.LlamaForCausalLM` loads our checkpoints unchanged; then what generation
needs (the KV cache, sampling), the loss as a formula and as the chunked kernel that training runs, and
the table of parameter names.
"""
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 4
    vocab_size: int = 6144
    hidden_dim: int = 0  # 0: derived from dim like LLaMA, 2/3 of 4*dim rounded up to multiple_of
    multiple_of: int = 64
    norm_eps: float = 1e-5
    max_seq_len: int = 512
    dropout: float = 0.0
    rope_theta: float = 10000.0

    def __post_init__(self):
        assert self.dim % self.n_heads == 0, f"dim {self.dim} is not divisible by n_heads {self.n_heads}"
        assert self.n_heads % self.n_kv_heads == 0, \
            f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
        if not self.hidden_dim:
            hidden = int(2 * 4 * self.dim / 3)
            self.hidden_dim = self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def head_dim(self):
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32 even under autocast: the mean of squares underflows in half precision.
        # The weight multiplies after the cast back, as in HF's LlamaRMSNorm.
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).type_as(x)


def rope_cos_sin(head_dim, max_seq_len, theta):
    """cos/sin tables of shape (max_seq_len, head_dim) in HF's "rotate half" layout.

    Each frequency appears twice, once for each half of the head, so q/k weights need no permutation
    to match `LlamaForCausalLM` (Meta's original code rotates interleaved pairs instead).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x: (batch, heads, seq, head_dim); cos/sin: (seq, head_dim), or (batch, 1, seq, head_dim) when each
    row has positions of its own."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, config, layer_id):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache=None, positions=None, mask=None):
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_id, positions, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_heads != self.n_kv_heads,
            dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(batch, seq, -1)
        return self.resid_dropout(self.wo(out))


class FeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)  # down, back to the residual
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)  # up
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, config, layer_id):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer_id)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, cache=None, positions=None, mask=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, positions, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight  # tied, as in HF's tie_word_embeddings
        cos, sin = rope_cos_sin(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._compiled_decode = None  # see compiled_decode_step
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch's output projection gets std 0.02/sqrt(2*n_layers), so
        # the residual stream's variance does not grow with depth. Only wo and w2 write to the residual.
        for name, param in self.named_parameters():
            if name.endswith("attention.wo.weight") or name.endswith("feed_forward.w2.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 per weight of every matmul (forward 2, backward 4), lm_head
        included, plus attention's two (seq x seq) matmuls. Under the causal mask a token attends to
        seq/2 positions on average, so attention counts 6 * n_layers * dim * seq, half of full attention."""
        c = self.config
        matmul_weights = self.num_params() - c.dim * (2 * c.n_layers + 1)  # all but the norms
        return 6 * matmul_weights + 6 * c.n_layers * c.dim * seq_len

    def forward(self, input_ids, labels=None, num_items_in_batch=None, logits_at=None):
        """Training and scoring: logits of every position (or, given a boolean mask logits_at (batch, seq), of
        those positions only, (positions, vocab): the output head is the largest matmul of a small model, and
        a mode that scores only answers need not run it on prompts), or, given labels, the loss.

        labels are aligned with input_ids (-100: no loss) and shifted here, as in HF. The loss is the mean
        over this batch's labelled tokens, or, given num_items_in_batch (as in HF), their sum divided by it:
        under gradient accumulation that weights every token of the optimizer step equally, however the
        tokens are spread over micro-batches. With labels, no logits are returned (see below).
        """
        seq = input_ids.shape[1]
        assert seq <= self.config.max_seq_len, \
            f"sequence of {seq} tokens is longer than max_seq_len {self.config.max_seq_len}"
        h = self.hidden_states(input_ids, self.rope_cos[:seq], self.rope_sin[:seq])
        if labels is None:
            return SimpleNamespace(logits=self.output(h if logits_at is None else h[logits_at]), loss=None)
        targets = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)  # position t predicts t + 1
        # The same sum as cross_entropy_sum(h, self.output.weight, targets), taken chunk by chunk so that
        # the logits of all the tokens, the largest tensor of a step, never exist at once.
        loss = chunked_cross_entropy_sum(h.reshape(-1, h.size(-1)), self.output.weight, targets)
        return SimpleNamespace(logits=None, loss=loss / (
            (targets != -100).sum() if num_items_in_batch is None else num_items_in_batch))

    def hidden_states(self, input_ids, cos, sin, cache=None, positions=None, mask=None):
        """The final norm's output (batch, seq, dim), before the output head."""
        h = self.dropout(self.tok_embeddings(input_ids))
        for layer in self.layers:
            h = layer(h, cos, sin, cache, positions, mask)
        return self.norm(h)

    def decode(self, input_ids, cache, input_lengths=None):
        """Generation: logits (batch, vocab) of the next token of each row, whose earlier tokens' keys and
        values are in `cache` (a KVCache); the new tokens' are written there. Each row continues its own
        sequence, at its own position.

        input_lengths (batch,): the rows are right-padded prompts of these lengths, prefilled together (a
        server admitting several requests at once). Each row's cache keeps its real tokens only (the pads'
        keys lie past its length, where the mask hides them and the next tokens overwrite them) and the
        logits are those of its last real token. A real token never sees a pad: they come after it."""
        seq = input_ids.shape[1]
        positions = cache.length[:, None] + torch.arange(seq, device=input_ids.device)  # (batch, seq)
        cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        # (batch, 1, seq, cache length): each new token sees its row's cache up to its own position.
        mask = (torch.arange(cache.max_len, device=input_ids.device) <= positions[..., None]).unsqueeze(1)
        cache.length += seq if input_lengths is None else input_lengths
        h = self.hidden_states(input_ids, cos, sin, cache, positions, mask)
        # Only the last position's distribution is needed: the other rows of the output head are skipped.
        last = h[:, -1] if input_lengths is None else h[torch.arange(len(h)), input_lengths - 1]
        return self.output(last)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 eos_token_id=None, streamer=None, compile=False):
        """Sample up to max_new_tokens after input_ids (batch, seq); returns prompt plus new ids (see sample)."""
        new = self.sample(input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, streamer, compile)
        return torch.cat([input_ids, new], dim=1)

    @torch.no_grad()
    def sample(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None,
               streamer=None, compile=False, prompt_lengths=None):
        """The new ids (batch, up to max_new_tokens) sampled after each row's prompt, as far as max_seq_len
        allows. input_ids (batch, seq) are the prompts, right-padded when prompt_lengths (batch,) gives
        each row's own length (rows then continue at their own positions, as in decode).

        temperature 0 is greedy. eos_token_id: an id or a list of ids (a model's generation_config may
        list several) that end a sequence; a finished sequence is padded with the first of them until
        all are done. `streamer(token_ids)` is called with each new column of ids, for streaming output.
        compile: run the one-token decoding steps through torch.compile (compiled on first use, then
        kept with the model); the prompt pass stays eager, as prompt lengths vary.
        """
        was_training = self.training
        self.eval()
        batch, prompt_len = input_ids.shape
        steps = min(max_new_tokens, self.config.max_seq_len - prompt_len)
        assert steps > 0, f"prompt of {prompt_len} tokens leaves no room under max_seq_len"
        new = torch.empty(batch, steps, dtype=torch.long, device=input_ids.device)
        cache = KVCache(self.config, batch, prompt_len + steps, input_ids.device)
        done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        if eos_token_id is not None:
            eos = torch.tensor(eos_token_id, device=input_ids.device).reshape(-1)
        decode_step = self.compiled_decode_step() if compile else self.decode
        logits = self.decode(input_ids, cache, prompt_lengths)  # the prompts, all at once
        for step in range(steps):
            next_token = sample_next_token(logits.float(), temperature, top_k, top_p)
            if eos_token_id is not None:
                next_token = torch.where(done, eos[0], next_token)
                done |= torch.isin(next_token, eos)
            new[:, step] = next_token
            if streamer is not None:
                streamer(next_token)
            # One device-to-host sync per token, only when there is something to stop on.
            if eos_token_id is not None and bool(done.all()):
                new = new[:, :step + 1]
                break
            if step + 1 < steps:
                logits = decode_step(next_token[:, None], cache)
        self.train(was_training)
        return new

    def compiled_decode_step(self):
        """decode through torch.compile, made once per model. A decoding step does little work per
        kernel, so on CPU the compiled graph is called from C++ (cpp_wrapper), not from Python.
        A new batch size or cache length compiles once more, with those sizes symbolic from then on."""
        if self._compiled_decode is None:
            on_cpu = self.tok_embeddings.weight.device.type == "cpu"
            self._compiled_decode = torch.compile(self.decode, options={"cpp_wrapper": on_cpu})
        return self._compiled_decode

    # --- Hugging Face Llama layout --------------------------------------------------------------

    def save_pretrained(self, out_dir, state_dict=None, token_ids=None):
        """config.json and model.safetensors as LlamaForCausalLM has them (lm_head is tied: not stored).

        state_dict: our weights when they live elsewhere (gathered from DDP or FSDP); token_ids: the
        tokenizer's bos/eos/pad ids for config.json."""
        from safetensors.torch import save_file
        from transformers import LlamaConfig
        os.makedirs(out_dir, exist_ok=True)
        c = self.config
        hf_config = LlamaConfig(
            hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
            num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, vocab_size=c.vocab_size,
            rms_norm_eps=c.norm_eps, max_position_embeddings=c.max_seq_len, rope_theta=c.rope_theta,
            tie_word_embeddings=True, attention_dropout=c.dropout, hidden_act="silu",
            architectures=["LlamaForCausalLM"], dtype="float32", **(token_ids or {}))
        hf_config.save_pretrained(out_dir)
        # Our own fields too, so that multiple_of and dropout survive a round trip.
        with open(os.path.join(out_dir, "tiny_llm_config.json"), "w") as f:
            json.dump(asdict(c), f, indent=2)
        state_dict = self.state_dict() if state_dict is None else state_dict
        weights = {to_hf_name(name): tensor.detach().float().contiguous().cpu()
                   for name, tensor in state_dict.items() if name != "output.weight"}
        save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, model_dir, strict=True, **config_overrides):
        """config_overrides replace fields that do not change the weights' shapes, such as dropout."""
        from safetensors.torch import load_file
        config = replace(load_config(model_dir), **config_overrides)
        model = cls(config)
        hf_weights = load_file(os.path.join(model_dir, "model.safetensors"))
        state = {from_hf_name(k): v for k, v in hf_weights.items() if k != "lm_head.weight"}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "output.weight"]  # tied to tok_embeddings
        if strict and (missing or unexpected):
            raise ValueError(f"{model_dir}: weights do not match the config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return model


# --- generation: the KV cache and sampling ------------------------------------------------------

class KVCache:
    """Preallocated keys and values for every layer, written in place at the positions being decoded.

    Attention always reads the whole cache (a mask hides what is not written yet), and the write
    positions are tensors, not Python ints: every decoding step sees the same shapes, so one compiled
    step serves every token without recompiling. Each row (sequence) has its own length, so sequences
    of different lengths decode side by side.

    A layer's buffers are allocated at its first write, in the dtype of the keys and values attention
    actually produced: bf16 under bf16 autocast although the weights are float32, float32 without."""

    def __init__(self, config, batch_size, max_len, device):
        self.shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k, self.v = [None] * config.n_layers, [None] * config.n_layers
        self.max_len = max_len
        self.length = torch.zeros(batch_size, dtype=torch.long, device=device)  # positions filled, per row

    def update(self, layer, positions, k, v):
        """Store k, v (batch, kv_heads, seq, head_dim) at positions (batch, seq); return the whole cache."""
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(self.shape)
            self.v[layer] = v.new_zeros(self.shape)
        index = positions[:, None, :, None].expand_as(k)
        self.k[layer].scatter_(2, index, k)
        self.v[layer].scatter_(2, index, v)
        return self.k[layer], self.v[layer]


def sample_next_token(logits, temperature, top_k, top_p, generator=None):
    """Next ids (batch,) from logits (batch, vocab), on the logits' device; generator: a torch.Generator
    of the request's own, for a seed that holds whatever else is being sampled at the same time."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already cover top_p; the first one always stays.
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    # One uniform number per row against the cumulative distribution: torch.multinomial draws from the same
    # distribution, but on CPU costs a random number per vocabulary entry (40x slower for 64 rows).
    cdf = logits.softmax(-1).cumsum(-1)
    u = torch.rand(len(logits), 1, device=logits.device, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=logits.size(-1) - 1)


# --- the loss, and the same loss in chunks ---------------------------------------------------------

def cross_entropy_sum(h, weight, targets):
    """The training loss: the summed cross-entropy of the logits h @ weight.T (float32, as HF's loss)
    against targets (-100: no loss). Transformer.forward takes the same sum with chunked_cross_entropy_sum."""
    return F.cross_entropy((h @ weight.t()).float(), targets, ignore_index=-100, reduction="sum")


def chunked_cross_entropy_sum(h, weight, targets):
    """cross_entropy_sum without ever holding all the logits, and faster (bench.py, section 1)."""
    return LinearCrossEntropy.apply(h, weight, targets, torch.is_grad_enabled())


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of the logits h @ weight.T against targets (-100: no loss), without ever
    holding all the logits. (tokens, vocab) is the largest tensor of a training step, and log_softmax
    with nll_loss passes over it about six times (log-probabilities, a zero-filled gradient, its
    backward); here the elementwise work happens on chunks of tokens, each small enough to stay in
    the CPU caches (256 tokens: 6 MB of logits at vocab 6144). On a GPU, where a kernel launch costs
    more than the traffic, a chunk is up to 8192 tokens.

    The loss is the last op of the model, so its gradients can be taken right away: each chunk turns
    its logits in place into d(loss)/d(logits) = softmax - onehot and feeds that to the two gradient
    matmuls; backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, h, weight, targets, grad_enabled):
        # Autograd is off in here: the caller's grad mode says whether gradients will be wanted at all.
        want_h, want_weight = (grad_enabled and wanted for wanted in ctx.needs_input_grad[:2])
        chunk = 256 if h.device.type == "cpu" else 8192
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        # Summed over chunks in float32 even when the weight is bf16 (FSDP's mixed precision).
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        for start in range(0, h.shape[0], chunk):
            h_chunk, t_chunk = h[start:start + chunk], targets[start:start + chunk]
            logits = (h_chunk @ weight.t()).float()  # float32 even under autocast, as HF's loss
            labelled = (t_chunk != -100)[:, None]
            t_chunk = t_chunk.clamp(min=0)[:, None]  # any valid index for unlabelled rows
            log_sum_exp = logits.logsumexp(-1, keepdim=True)
            loss += ((log_sum_exp - logits.gather(1, t_chunk)) * labelled).sum()
            if want_h or want_weight:
                d_logits = logits.sub_(log_sum_exp).exp_()  # softmax
                d_logits.scatter_add_(1, t_chunk, -labelled.float())  # minus the one-hot target
                d_logits = d_logits.mul_(labelled).to(h.dtype)  # unlabelled rows: no gradient
                if want_h:
                    grad_h[start:start + chunk] = d_logits @ weight
                if want_weight:
                    grad_weight += d_logits.t() @ h_chunk
        ctx.save_for_backward(grad_h, None if grad_weight is None else grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return tuple(None if grad is None else grad * grad_loss for grad in ctx.saved_tensors) + (None, None)


# --- Hugging Face's names -------------------------------------------------------------------

def load_config(model_dir):
    """ModelConfig from our own file when present, else from a plain HF Llama config.json."""
    ours = os.path.join(model_dir, "tiny_llm_config.json")
    if os.path.exists(ours):
        with open(ours) as f:
            return ModelConfig(**json.load(f))
    with open(os.path.join(model_dir, "config.json")) as f:
        hf = json.load(f)
    rope_theta = hf.get("rope_theta") or hf.get("rope_parameters", {}).get("rope_theta", 10000.0)
    return ModelConfig(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                       n_heads=hf["num_attention_heads"],
                       n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                       vocab_size=hf["vocab_size"], hidden_dim=hf["intermediate_size"],
                       norm_eps=hf["rms_norm_eps"], max_seq_len=hf["max_position_embeddings"],
                       rope_theta=rope_theta)


# Our parameter names (llama2.c style) and HF's, module by module.
_TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _rename(name, top, layer, layer_prefix):
    """Rename `module.param` with the two tables; names they do not know come back unchanged."""
    module, param = name.rsplit(".", 1)
    if name.startswith(layer_prefix):
        index, sub = module[len(layer_prefix):].split(".", 1)
        return f"{top['layers']}{index}.{layer.get(sub, sub)}.{param}"
    return f"{top.get(module, module)}.{param}"


def to_hf_name(name):
    return _rename(name, {**_TOP_NAMES, "layers": "model.layers."}, _LAYER_NAMES, "layers.")


def from_hf_name(name):
    top = {hf: ours for ours, hf in _TOP_NAMES.items()}
    layer = {hf: ours for ours, hf in _LAYER_NAMES.items()}
    return _rename(name, {**top, "layers": "layers."}, layer, "model.layers.")
