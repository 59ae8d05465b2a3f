"""export_gguf.py: the GGUF file read back by the libraries that read GGUF for a living.

`gguf.GGUFReader` (llama.cpp's own Python reader) checks names, shapes, types, values and metadata;
transformers' GGUF loader (its own reading of llama.cpp's layout, rotary un-permutation included) must
compute the same logits as the checkpoint and tokenize as its tokenizer; plain Jinja2 must render the
chat template as transformers does. A run in llama.cpp itself is measured once, in the README.
"""
import functools
import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import write_tiny_model

OUTTYPES = ["f32", "f16", "q8_0"]
LLAMA_BLOCK_TENSORS = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
                       "ffn_up", "ffn_down"]
# Chinese, emoji, full-width punctuation, spaces and every special token, in and out of text.
TEXT = ("《静夜思》 李白\n床前明月光，疑是地上霜。 😀🎉 👩‍💻  two  spaces\tTab it's 3.14 "
        "<|endoftext|><|im_start|>user\n你好<|im_end|>\n<|pad|>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny model directory as train_model.py writes it, with random norms and a rope theta and norm
    eps that are not the defaults (a value the export ignored would show)."""
    def randomise_norms(model):
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.copy_(1 + 0.5 * torch.randn(p.shape))
    return write_tiny_model(tmp_path_factory.mktemp("export") / "tiny", tokenizer, edit=randomise_norms,
                            rope_theta=50000.0, norm_eps=1e-6)


@pytest.fixture(scope="module")
def exported(model_dir):
    """{outtype: path of the GGUF file}."""
    import export_gguf
    paths = {}
    for outtype in OUTTYPES:
        paths[outtype] = os.path.join(os.path.dirname(model_dir), f"tiny-{outtype}.gguf")
        export_gguf.main(["--model", model_dir, "--out", paths[outtype], "--outtype", outtype])
    return paths


@functools.lru_cache(maxsize=None)
def read(path):
    """The file as llama.cpp's own Python reader sees it (read once per file: each test only looks)."""
    import gguf
    return gguf.GGUFReader(path)


def field(reader, key):
    return reader.fields[key].contents()


def checkpoint(model_dir):
    from safetensors.torch import load_file
    return {k: v.numpy() for k, v in load_file(os.path.join(model_dir, "model.safetensors")).items()}


def hf_name(gguf_name):
    """The checkpoint's tensor for a llama.cpp tensor name, by the names llama.cpp and HF give them."""
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if gguf_name in top:
        return top[gguf_name]
    _, layer, kind, _ = gguf_name.split(".")
    hf = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}[kind]
    return f"model.layers.{layer}.{hf}.weight"


def dequantized(tensor):
    from gguf import quants
    return quants.dequantize(tensor.data, tensor.tensor_type).reshape(tensor.data.shape[0], -1) \
        if tensor.data.ndim == 2 else np.asarray(tensor.data, dtype=np.float32)


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_tensors_have_llama_cpp_names_shapes_and_types(exported, model_dir, outtype):
    weights = checkpoint(model_dir)
    tensors = {t.name: t for t in read(exported[outtype]).tensors}
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{kind}.weight" for i in range(2) for kind in LLAMA_BLOCK_TENSORS}
    assert set(tensors) == expected  # tied embeddings: no output.weight, llama.cpp reuses token_embd
    matrix_type = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[outtype]
    for name, tensor in tensors.items():
        source = weights[hf_name(name)]
        assert list(tensor.shape) == list(reversed(source.shape)), name  # GGUF lists the fastest dim first
        assert tensor.tensor_type.name == (matrix_type if source.ndim == 2 else "F32"), name
        assert dequantized(tensor).shape == source.shape, name


def test_q8_0_keeps_f16_for_rows_that_do_not_split_into_blocks_of_32(tmp_path, tokenizer):
    """q8_0 quantises blocks of 32 along a row; a matrix with rows of another length stays f16 (width 48:
    every matrix but ffn_down, whose rows are 128 long)."""
    import export_gguf
    write_tiny_model(tmp_path / "m", tokenizer, dim=48, n_layers=1)
    export_gguf.main(["--model", str(tmp_path / "m"), "--out", str(tmp_path / "m.gguf"), "--outtype", "q8_0"])
    types = {t.name: t.tensor_type.name for t in read(str(tmp_path / "m.gguf")).tensors}
    assert types.pop("blk.0.ffn_down.weight") == "Q8_0"
    assert {name: kind for name, kind in types.items() if "norm" not in name} == {
        name: "F16" for name in types if "norm" not in name}


def test_f32_values_equal_the_checkpoint(exported, model_dir):
    """Every tensor bit for bit, except that wq and wk have their rows reordered within each head (the
    rotary layout; that the order is the right one is tested through transformers below)."""
    weights = checkpoint(model_dir)
    heads = {"attn_q": 4, "attn_k": 2}
    for tensor in read(exported["f32"]).tensors:
        source, values = weights[hf_name(tensor.name)], dequantized(tensor)
        kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
        if kind in heads:
            assert not np.array_equal(values, source), f"{tensor.name} was not reordered"
            by_head = values.reshape(heads[kind], -1, source.shape[1])
            source_by_head = source.reshape(heads[kind], -1, source.shape[1])
            for head, source_head in zip(by_head, source_by_head):
                assert sorted(map(tuple, head)) == sorted(map(tuple, source_head)), tensor.name
        else:
            np.testing.assert_array_equal(values, source, err_msg=tensor.name)


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_f16_and_q8_0_dequantise_to_the_f32_values(exported, outtype):
    exact = {t.name: dequantized(t) for t in read(exported["f32"]).tensors}
    for tensor in read(exported[outtype]).tensors:
        values, reference = dequantized(tensor), exact[tensor.name]
        if reference.ndim == 1:
            np.testing.assert_array_equal(values, reference)
        elif outtype == "f16":
            np.testing.assert_allclose(values, reference, rtol=1e-3, atol=1e-6, err_msg=tensor.name)
        else:  # int8 steps of d = block max / 127, per block of 32: an error of at most half a step,
            # plus up to 127 steps times the f16 rounding of d (2^-11 relative)
            step = np.abs(reference).reshape(reference.shape[0], -1, 32).max(axis=-1, keepdims=True) / 127
            error = np.abs(values - reference).reshape(step.shape[0], -1, 32)
            assert (error <= step * (0.5 + 127 * 2.0**-11) + 1e-7).all(), tensor.name
            assert not np.array_equal(values, reference), "q8_0 stored the exact values"


def test_metadata(exported, model_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    reader = read(exported["q8_0"])
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.file_type") == 7  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q8_0
    expected = {"context_length": 128, "embedding_length": 64, "block_count": 2, "feed_forward_length":
                config["intermediate_size"], "attention.head_count": 4, "attention.head_count_kv": 2,
                "rope.dimension_count": 16, "vocab_size": config["vocab_size"]}
    for key, value in expected.items():
        assert field(reader, f"llama.{key}") == value, key
    assert field(reader, "llama.rope.freq_base") == 50000.0
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6, rel=1e-6)

    hf_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens == [spec.id_to_token(i) for i in range(len(hf_tokenizer))]
    token_types = field(reader, "tokenizer.ggml.token_type")
    specials = {hf_tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                                               "<|pad|>")}
    assert {i for i, kind in enumerate(token_types) if kind == 3} == specials  # 3: CONTROL
    assert {kind for i, kind in enumerate(token_types) if i not in specials} == {1}  # 1: NORMAL
    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
        merges = json.load(f)["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(pair) for pair in merges]
    assert field(reader, "tokenizer.ggml.bos_token_id") == hf_tokenizer.bos_token_id \
        == hf_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert field(reader, "tokenizer.ggml.eos_token_id") == hf_tokenizer.eos_token_id \
        == hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert field(reader, "tokenizer.ggml.padding_token_id") == hf_tokenizer.pad_token_id
    # Our tokenizer adds no token to an encoding; llama.cpp and Ollama must not either.
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.ggml.add_eos_token") is False


def test_chat_template_renders_with_plain_jinja_as_in_transformers(exported, model_dir):
    """Plain Jinja2 (llama-cpp-python, many servers) renders the file's template; transformers' training
    markers ({% generation %}) are gone, and the text is what the tokenizer's template renders."""
    import jinja2
    from transformers import AutoTokenizer
    template = field(read(exported["f16"]), "tokenizer.chat_template")
    assert "endgeneration" not in template
    messages = [{"role": "system", "content": "你是诗人。"}, {"role": "user", "content": "春天"},
                {"role": "assistant", "content": "春眠不觉晓"}, {"role": "user", "content": "下一句？"}]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for add_generation_prompt in (True, False):
        rendered = jinja2.Environment().from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt)
        assert rendered == tokenizer.apply_chat_template(messages, tokenize=False,
                                                         add_generation_prompt=add_generation_prompt)


@pytest.fixture(scope="module")
def reference(model_dir):
    """The checkpoint in transformers' LlamaForCausalLM."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.mark.parametrize("outtype,atol", [("f32", 1e-5), ("f16", 2e-3), ("q8_0", 3e-2)])
def test_transformers_reads_the_file_as_the_same_model(exported, model_dir, reference, outtype, atol):
    """transformers' GGUF loader undoes llama.cpp's rotary layout by itself: its logits equal the
    checkpoint's only if the export reordered wq and wk as llama.cpp expects and wrote every
    hyperparameter right. Its tokenizer, built from the file's vocabulary and merges, tokenizes as ours."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging
    logging.disable_progress_bar()
    folder, name = os.path.split(exported[outtype])
    from_gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    ids = torch.randint(len(AutoTokenizer.from_pretrained(model_dir)), (2, 40),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(ids).logits, from_gguf(ids).logits
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    if outtype == "f32":
        ours = AutoTokenizer.from_pretrained(model_dir)
        theirs = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        assert theirs(TEXT, add_special_tokens=False)["input_ids"] == ours(TEXT, add_special_tokens=False)["input_ids"]


# --- bad input ---------------------------------------------------------------------------------------

def export_error(capfd, *argv):
    import export_gguf
    with pytest.raises(SystemExit) as stopped:
        export_gguf.main([str(a) for a in argv])
    code = stopped.value.code
    assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code, code
    assert "Traceback" not in capfd.readouterr().err
    return code


def test_not_a_model_directory(tmp_path, capfd):
    assert "has no config.json" in export_error(capfd, "--model", tmp_path, "--out", tmp_path / "m.gguf")
    assert "has no config.json" in export_error(capfd, "--model", tmp_path / "missing", "--out", tmp_path / "m.gguf")
    assert not os.listdir(tmp_path)


def test_unknown_outtype(model_dir, tmp_path, capfd):
    assert "q4_0" in export_error(capfd, "--model", model_dir, "--out", tmp_path / "m.gguf", "--outtype", "q4_0")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("where", ["missing_dir", "a_directory"])
def test_unwritable_out_leaves_nothing(model_dir, tmp_path, capfd, where):
    out = tmp_path / "no" / "such" / "m.gguf" if where == "missing_dir" else tmp_path
    message = export_error(capfd, "--model", model_dir, "--out", out)
    assert f"cannot write {out}" in message
    assert [p for p in tmp_path.rglob("*")] == []


def test_a_tokenizer_llama_cpp_would_read_differently_is_refused(model_dir, tmp_path, capfd):
    """A normalizer (or another pre-tokenizer) would make llama.cpp's "gpt-2" tokenize differently."""
    changed = tmp_path / "model"
    shutil.copytree(model_dir, changed)
    with open(changed / "tokenizer.json", encoding="utf-8") as f:
        spec = json.load(f)
    spec["normalizer"] = {"type": "NFKC"}
    with open(changed / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(spec, f)
    assert "byte-level BPE" in export_error(capfd, "--model", changed, "--out", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
