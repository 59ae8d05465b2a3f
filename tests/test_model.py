"""The model against Hugging Face's LlamaForCausalLM, the reference implementation of the architecture.

Our checkpoints are meant to load unchanged as `LlamaForCausalLM`; so HF serves as the oracle for the
forward pass, the loss and greedy generation. The model is trained first (conftest's chain_model, until it
has learnt a cycle of tokens), so that its weights are not just the initialisation (norm weights of ones, for
instance, would hide a mix-up of the two norms) and greedy generation has a path to follow.
"""
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import chain_prompts, hf_greedy, load_hf, tiny_config
from model import KVCache, ModelConfig, Transformer

ATOL = 1e-4


def perturb(model, seed=0):
    """Random non-initial weights, norms included (cheaper than training, for extra configurations)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def random_ids(vocab_size, batch, seq, seed):
    return torch.randint(vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


# --- loading as LlamaForCausalLM --------------------------------------------------------------------

def test_training_moved_the_weights_away_from_init(chain_model):
    model, _, _ = chain_model
    norm = model.layers[0].attention_norm.weight
    assert not torch.allclose(norm, torch.ones_like(norm)), "norm weights are still the initial ones"


def test_loads_as_stock_llama(chain_model):
    from transformers import LlamaForCausalLM
    _, model_dir, hf = chain_model
    assert type(hf) is LlamaForCausalLM
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in config
    assert not [name for name in os.listdir(model_dir) if name.endswith(".py")]
    assert hf.dtype == torch.float32
    # Tied embeddings survive: HF's lm_head is the embedding matrix.
    assert torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)


@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 9), (3, 64), (1, 128)])
def test_logits_match_hf(chain_model, batch, seq):
    model, _, hf = chain_model
    ids = random_ids(model.config.vocab_size, batch, seq, seed=seq)
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert ours.shape == theirs.shape == (batch, seq, model.config.vocab_size)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 1), (4, 2), (4, 4), (8, 2)])
def test_gqa_and_mha_configs_match_hf(tmp_path, n_heads, n_kv_heads):
    # A non-default rope_theta and norm_eps too: they must reach HF's config under the names it reads.
    config = tiny_config(500, n_heads=n_heads, n_kv_heads=n_kv_heads, rope_theta=50000.0, norm_eps=1e-6)
    torch.manual_seed(n_heads * 10 + n_kv_heads)
    model = perturb(Transformer(config), seed=n_kv_heads)
    model.save_pretrained(str(tmp_path))
    hf = load_hf(str(tmp_path))
    assert hf.config.num_key_value_heads == n_kv_heads
    ids = random_ids(500, 2, 40, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)


def test_rope_theta_is_not_ignored(tmp_path):
    """Guards the previous test: a different rope_theta must change the logits, else it tests nothing."""
    torch.manual_seed(0)
    a = perturb(Transformer(tiny_config(500, rope_theta=10000.0)))
    b = Transformer(tiny_config(500, rope_theta=50.0)).eval()
    b.load_state_dict(a.state_dict())
    ids = random_ids(500, 1, 40, seed=4)
    with torch.no_grad():
        assert (a(ids).logits - b(ids).logits).abs().max() > 1e-3


# --- loss ---------------------------------------------------------------------------------------------

def _labels_with_holes(ids, seed):
    g = torch.Generator().manual_seed(seed)
    labels = ids.clone()
    labels[torch.rand(ids.shape, generator=g) < 0.4] = -100
    labels[0, :5] = -100  # a prompt-like masked prefix
    return labels


def test_loss_matches_hf_with_ignored_labels(chain_model):
    model, _, hf = chain_model
    ids = random_ids(model.config.vocab_size, 2, 30, seed=11)
    labels = _labels_with_holes(ids, seed=11)
    with torch.no_grad():
        ours = model(ids, labels=labels).loss
        theirs = hf(ids, labels=labels).loss
        unmasked = model(ids, labels=ids).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert abs(ours - unmasked) > 1e-4  # the -100 positions really were left out
    # And independently: mean cross-entropy of the shifted, labelled positions.
    logits = model(ids).logits.detach()
    keep = labels[:, 1:] != -100
    manual = F.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep])
    torch.testing.assert_close(ours, manual, atol=1e-5, rtol=0)


def test_num_items_in_batch_is_a_sum_over_tokens(chain_model):
    model, _, hf = chain_model
    ids = random_ids(model.config.vocab_size, 2, 30, seed=12)
    labels = _labels_with_holes(ids, seed=12)
    labelled = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        logits = model(ids).logits
        keep = labels[:, 1:] != -100
        token_sum = F.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep], reduction="sum")
        for n in (1, 7.0, 1000):
            ours = model(ids, labels=labels, num_items_in_batch=n).loss
            torch.testing.assert_close(ours, token_sum / n, atol=1e-5, rtol=1e-6)
            theirs = hf(ids, labels=labels, num_items_in_batch=n).loss
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-6)
        # Dividing by this batch's own count gives back the mean.
        torch.testing.assert_close(model(ids, labels=labels, num_items_in_batch=labelled).loss,
                                   model(ids, labels=labels).loss, atol=1e-6, rtol=0)


def test_gradients_match_hf(chain_model):
    """The loss's gradients, which chunked_cross_entropy_sum computes by hand in chunks of 256 tokens (384
    tokens here: a full chunk and a partial one), are autograd's through HF's model, every weight."""
    import copy
    from model import to_hf_name
    model, _, hf = (copy.deepcopy(m) for m in chain_model)
    ids = random_ids(model.config.vocab_size, 3, 128, seed=13)
    labels = _labels_with_holes(ids, seed=13)
    model(ids, labels=labels, num_items_in_batch=100).loss.backward()
    hf(ids, labels=labels, num_items_in_batch=100).loss.backward()
    theirs = dict(hf.named_parameters())
    for name, param in model.named_parameters():  # output.weight is tok_embeddings.weight: both uses
        expected = theirs[to_hf_name(name)].grad
        torch.testing.assert_close(param.grad, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("h_grad,weight_grad", [(True, True), (True, False), (False, True)])
def test_the_chunked_loss_is_the_formula_with_only_the_gradients_asked_for(h_grad, weight_grad):
    """chunked_cross_entropy_sum, what training runs, against cross_entropy_sum, the formula, through
    autograd: the same loss and gradients, whichever inputs require gradients (a frozen output layer, or
    a frozen body below an untied one); and the same loss under no_grad."""
    from model import chunked_cross_entropy_sum, cross_entropy_sum
    g = torch.Generator().manual_seed(14)
    h, weight = torch.randn(300, 16, generator=g), torch.randn(50, 16, generator=g)
    targets = torch.randint(50, (300,), generator=g)
    targets[::7] = -100
    results = []
    for ours in (True, False):
        a, b = h.clone().requires_grad_(h_grad), weight.clone().requires_grad_(weight_grad)
        loss = (chunked_cross_entropy_sum if ours else cross_entropy_sum)(a, b, targets)
        (3 * loss).backward()
        results.append((loss.detach(), a.grad, b.grad))
    (loss, grad_h, grad_weight), (expected_loss, expected_h, expected_weight) = results
    torch.testing.assert_close(loss, expected_loss)
    for grad, expected in [(grad_h, expected_h), (grad_weight, expected_weight)]:
        assert (grad is None) == (expected is None)
        if expected is not None:
            torch.testing.assert_close(grad, expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        loss = chunked_cross_entropy_sum(h.requires_grad_(), weight, targets)
    torch.testing.assert_close(loss, expected_loss)


# --- generation ---------------------------------------------------------------------------------------

def test_greedy_generate_matches_hf(chain_model):
    model, _, hf = chain_model
    ids = chain_prompts(model.config.vocab_size, [0], 6)
    ours = model.generate(ids, 20, temperature=0)
    theirs = hf_greedy(hf, ids, 20)
    assert ours.shape == (1, 26)
    assert torch.equal(ours, theirs)
    assert len(set(ours[0, 6:].tolist())) > 1, "a degenerate run: the comparison would be weak"


def test_greedy_generate_matches_hf_for_a_batch(chain_model):
    model, _, hf = chain_model
    ids = chain_prompts(model.config.vocab_size, [3, 17], 7)
    ours = model.generate(ids, 15, temperature=0)
    assert torch.equal(ours, hf_greedy(hf, ids, 15))
    # Rows of a batch do not influence each other.
    for row in range(2):
        assert torch.equal(ours[row:row + 1], model.generate(ids[row:row + 1], 15, temperature=0))


def test_prompts_of_different_lengths_sample_together_as_each_alone(chain_model):
    """sample() with right-padded prompts and their lengths (RL rollouts: a batch of prompts of their own
    lengths): each row's new tokens are those of its prompt decoded alone (greedy, random prompts, so that
    a row attending to another row's padding would show)."""
    model, _, _ = chain_model
    lengths = [3, 9, 6]
    prompts = [random_ids(model.config.vocab_size, 1, n, seed=40 + n)[0] for n in lengths]
    padded = torch.zeros(3, 9, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        padded[row, :len(prompt)] = prompt
    together = model.sample(padded, 12, temperature=0, prompt_lengths=torch.tensor(lengths))
    for row, prompt in enumerate(prompts):
        assert torch.equal(together[row], model.sample(prompt[None], 12, temperature=0)[0]), row


def test_kv_cache_generation_equals_full_recompute(chain_model):
    model, _, _ = chain_model
    ids = random_ids(model.config.vocab_size, 2, 5, seed=23)
    expected = ids
    with torch.no_grad():
        for _ in range(25):
            next_token = model(expected).logits[:, -1].argmax(-1)
            expected = torch.cat([expected, next_token[:, None]], dim=1)
    assert torch.equal(model.generate(ids, 25, temperature=0), expected)


def test_kv_cache_logits_equal_the_full_forward(chain_model):
    """Through the cache, a prompt, then a chunk of 6 tokens, then token by token: each last position's
    logits are the full forward's (random tokens, so that they depend on the context and on the
    positions, not only on the last token). The cache is longer than what gets written: attention
    must not see its unwritten end, nor a chunk's later tokens."""
    model, _, _ = chain_model
    ids = random_ids(model.config.vocab_size, 2, 40, seed=29)
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(model.config, 2, 48, ids.device)
        for start, end in [(0, 10), (10, 16)] + [(pos, pos + 1) for pos in range(16, 40)]:
            logits = model.decode(ids[:, start:end], cache)
            torch.testing.assert_close(logits, full[:, end - 1], atol=ATOL, rtol=0)
        assert cache.length.tolist() == [40, 40]


@pytest.mark.slow
def test_compiled_generate_equals_eager(chain_model):
    """generate(compile=True): the same tokens as eager, for a batch that stops on eos and for a second
    prompt length (one recompilation, with symbolic sizes); the same shapes again compile nothing."""
    model, _, _ = chain_model
    ids = chain_prompts(model.config.vocab_size, [0, 10], 6)
    eos = model.generate(ids, 20, temperature=0)[0, 6 + 7].item()  # row 0 stops early, row 1 runs on
    for prompt, n in [(ids, 20), (ids[:, :4], 30)]:
        eager = model.generate(prompt, n, temperature=0, eos_token_id=eos)
        assert torch.equal(model.generate(prompt, n, temperature=0, eos_token_id=eos, compile=True), eager)
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = model.generate(ids, 20, temperature=0, eos_token_id=eos, compile=True)
    assert torch.equal(again, model.generate(ids, 20, temperature=0, eos_token_id=eos))


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_generate_under_autocast_equals_the_converted_model(chain_model, dtype, device):
    """Under autocast (as bench.py and a GPU run generate) attention yields half-precision keys and values
    from float32 weights; the cache must take them (it was made in the weights' dtype and index_copy_
    refused). Eager and compiled give the tokens of the model converted to that dtype, and of float32."""
    trained_model, _, _ = chain_model
    model = Transformer(trained_model.config).eval()
    model.load_state_dict(trained_model.state_dict())
    model = model.to(device)
    ids = chain_prompts(model.config.vocab_size, [0, 10], 6).to(device)
    converted = Transformer(model.config).eval()
    converted.load_state_dict(model.state_dict())
    expected = converted.to(device, dtype).generate(ids, 20, temperature=0)
    assert torch.equal(expected, model.generate(ids, 20, temperature=0))  # the chain holds in both
    with torch.autocast(device, dtype=dtype):
        assert torch.equal(model.generate(ids, 20, temperature=0), expected)
        assert torch.equal(model.generate(ids, 20, temperature=0, compile=True), expected)
        cache = KVCache(model.config, 2, 8, ids.device)
        model.decode(ids, cache)
    assert cache.k[0].dtype == cache.v[0].dtype == dtype


def test_generate_stops_at_max_seq_len(chain_model):
    model, _, _ = chain_model
    ids = random_ids(model.config.vocab_size, 1, 120, seed=24)
    out = model.generate(ids, 50, temperature=0)
    assert out.shape == (1, model.config.max_seq_len)
    assert torch.equal(out[:, :120], ids)


def test_top_k_1_and_tiny_top_p_equal_greedy(chain_model):
    model, _, _ = chain_model
    ids = random_ids(model.config.vocab_size, 2, 6, seed=25)
    greedy = model.generate(ids, 12, temperature=0)
    torch.manual_seed(0)
    assert torch.equal(model.generate(ids, 12, temperature=1.0, top_k=1), greedy)
    torch.manual_seed(1)
    assert torch.equal(model.generate(ids, 12, temperature=1.5, top_p=1e-6), greedy)


def test_sampling_draws_from_the_distribution():
    """Plain sampling draws each token as often as softmax(logits / temperature) says (never one of
    probability 0), and top_k and top_p restrict it to the best tokens."""
    from model import sample_next_token
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 0.5, float("-inf")]]).repeat(20000, 1)
    torch.manual_seed(0)
    for temperature in (1.0, 0.5):
        draws = sample_next_token(logits, temperature, None, None)
        freq = torch.bincount(draws, minlength=6).float() / len(draws)
        torch.testing.assert_close(freq, (logits[0] / temperature).softmax(-1), atol=0.01, rtol=0)
    top2 = sample_next_token(logits, 1.0, 2, None)
    assert set(top2.tolist()) == {2, 3}
    # top_p 0.7: 3 alone covers 0.61 < 0.7, so 2 stays as well; nothing else.
    assert set(sample_next_token(logits, 1.0, None, 0.7).tolist()) == {2, 3}


def test_eos_stops_generation(chain_model):
    model, _, _ = chain_model
    ids = chain_prompts(model.config.vocab_size, [5], 6)
    free = model.generate(ids, 20, temperature=0)[0, 6:].tolist()
    # The first new token that did not occur before it: generation must stop right after it.
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    out = model.generate(ids, 20, temperature=0, eos_token_id=free[k])
    assert out[0, 6:].tolist() == free[:k + 1]


def test_eos_in_a_batch_pads_finished_rows(chain_model):
    model, _, _ = chain_model
    ids = chain_prompts(model.config.vocab_size, [0, 10], 6)
    free = model.generate(ids, 20, temperature=0)[:, 6:].tolist()

    def first(row, token):
        return row.index(token) if token in row else None

    # An eos that row 0 produces before row 1 does (or that row 1 never produces).
    eos = next(t for t in free[0] if first(free[1], t) is None or first(free[1], t) > first(free[0], t))
    stops = [first(row, eos) for row in free]
    length = max(20 if s is None else s + 1 for s in stops)
    out = model.generate(ids, 20, temperature=0, eos_token_id=eos)
    assert out.shape == (2, 6 + length)
    assert torch.equal(out[:, :6], ids)
    for row, stop in zip(range(2), stops):
        if stop is None:
            expected = free[row][:length]
        else:  # a finished row is padded with eos until the batch is done
            expected = free[row][:stop + 1] + [eos] * (length - stop - 1)
        assert out[row, 6:].tolist() == expected
    assert length - stops[0] - 1 > 0, "row 0 should have been padded"


def test_streamer_sees_every_new_column(chain_model):
    model, _, _ = chain_model
    ids = random_ids(model.config.vocab_size, 2, 4, seed=28)
    columns = []
    out = model.generate(ids, 6, temperature=0, streamer=lambda t: columns.append(t.clone()))
    assert torch.equal(torch.stack(columns, dim=1), out[:, 4:])


# --- saving and loading ------------------------------------------------------------------------------

def test_from_pretrained_round_trips_exactly(chain_model):
    model, model_dir, _ = chain_model
    loaded = Transformer.from_pretrained(model_dir).eval()
    assert loaded.config == model.config
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert loaded.output.weight is loaded.tok_embeddings.weight  # still tied after loading
    ids = random_ids(model.config.vocab_size, 2, 17, seed=31)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_loads_a_plain_hf_llama_directory(chain_model, tmp_path):
    """A directory written by HF itself (no tiny_llm_config.json) loads into our Transformer."""
    model, _, hf = chain_model
    hf.save_pretrained(str(tmp_path))
    assert not os.path.exists(tmp_path / "tiny_llm_config.json")
    loaded = Transformer.from_pretrained(str(tmp_path)).eval()
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "norm_eps",
                  "max_seq_len", "rope_theta"):
        assert getattr(loaded.config, field) == getattr(model.config, field), field
    ids = random_ids(model.config.vocab_size, 1, 20, seed=32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=ATOL, rtol=0)


def test_from_pretrained_rejects_mismatched_weights(chain_model, tmp_path):
    _, model_dir, _ = chain_model
    shutil.copytree(model_dir, tmp_path / "m")
    with open(tmp_path / "m" / "tiny_llm_config.json") as f:
        config = json.load(f)
    config["n_layers"] = 3
    with open(tmp_path / "m" / "tiny_llm_config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="missing"):
        Transformer.from_pretrained(str(tmp_path / "m"))


# --- initialisation and FLOPs --------------------------------------------------------------------

def test_scaled_init_of_residual_projections():
    n_layers = 8
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=256,
                                    max_seq_len=32))

    def std(suffix):
        weights = [p.detach().flatten() for n, p in model.named_parameters() if n.endswith(suffix)]
        assert len(weights) == n_layers
        return torch.cat(weights).std().item()

    scaled = 0.02 / math.sqrt(2 * n_layers)  # 0.005
    for suffix in ("attention.wo.weight", "feed_forward.w2.weight"):
        assert std(suffix) == pytest.approx(scaled, rel=0.05), suffix
    for suffix in ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                   "feed_forward.w1.weight", "feed_forward.w3.weight"):
        assert std(suffix) == pytest.approx(0.02, rel=0.05), suffix
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert torch.equal(p, torch.ones_like(p)), name


def test_hidden_dim_follows_llama():
    assert ModelConfig(dim=64).hidden_dim == 192      # 2/3 * 256 = 170.7 -> next multiple of 64
    assert ModelConfig(dim=512).hidden_dim == 1408    # 2/3 * 2048 = 1365.3 -> 1408
    assert ModelConfig(dim=64, hidden_dim=100).hidden_dim == 100


def test_flops_per_token_by_hand():
    # dim 64, 4 heads of 16, 2 kv heads (k and v are 64 x 32), hidden 192, vocab 1000, 2 layers.
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000,
                                    max_seq_len=128))
    attention = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64        # wq, wk, wv, wo
    ffn = 3 * 64 * 192                                         # w1, w2, w3
    lm_head = 1000 * 64                                        # tied with the embedding: counted once
    matmul_weights = 2 * (attention + ffn) + lm_head
    for seq in (1, 128):
        assert model.flops_per_token(seq) == 6 * matmul_weights + 6 * 2 * 64 * seq
    assert model.num_params() == matmul_weights + 64 * (2 * 2 + 1)  # plus the norm weights
