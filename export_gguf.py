"""Export a model directory from train_model.py to one GGUF file, for llama.cpp, Ollama and LM Studio.

    python export_gguf.py --model runs/demo/sft --out tiny-llm.gguf               (f16, the default)
    python export_gguf.py --model runs/demo/sft --out tiny-llm-q8_0.gguf --outtype q8_0

The file holds what llama.cpp needs to run the model with no other file: the `llama` architecture's
hyperparameters, the weights, the byte-level BPE vocabulary with its merges, the bos/eos/padding ids and
the ChatML chat template. It is written with `gguf`, llama.cpp's own Python library.

Why not llama.cpp's convert_hf_to_gguf.py: it recognises a BPE pre-tokenizer by hashing the ids its
tokenizer gives for a test string, and every vocabulary we train hashes differently, so it refuses them
all ("BPE pre-tokenizer was not recognized"). The pre-tokenizer itself is always GPT-2's byte-level regex
(tokenizer.py), and llama.cpp implements it under the name "gpt-2"; this script checks that the tokenizer
is such a tokenizer and says so in the file.

Two layouts differ from the Hugging Face checkpoint:
- Rotary embeddings. HF's Llama (and our model.py) rotate the pairs (i, i + head_dim/2) of each head
  ("rotate half"); llama.cpp's `llama` rotates adjacent pairs (2i, 2i + 1), as Meta's original code did.
  The rows of wq and wk are reordered within each head so that llama.cpp's pairs are HF's pairs; q·k, and
  so attention, is unchanged. wv and wo are not rotated and stay as they are.
- Tied output layer: only token_embd is written; llama.cpp uses it for the output when output.weight is
  missing.

Trade-offs of --outtype: f32 is exact (4 bytes a weight); f16 halves the file with a relative error of
about 1e-3 per weight; q8_0 stores blocks of 32 weights as int8 with one f16 scale (8.5 bits a weight,
about a quarter of f32) with errors up to half a step of the block's scale. As in llama.cpp's converter,
1-D tensors (the RMSNorm weights) stay f32, and a matrix whose rows do not split into blocks of 32 falls
back to f16.
"""
import argparse
import json
import os
import re
import sys

GGUF_TYPES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}  # --outtype -> GGMLQuantizationType name
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}  # -> LlamaFileType name

# transformers' {% generation %} ... {% endgeneration %} marks the assistant's tokens for training
# (SFTDataset's loss mask) and renders nothing. Plain Jinja (llama-cpp-python, the Jinja2 behind many
# servers) does not know the tag and rejects the template, so the exported template goes without it.
GENERATION_TAGS = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


class ExportError(Exception):
    """Bad input: main() prints it as a one-line error."""


def check_gpt2_byte_level_bpe(tokenizer_json):
    """Raise ExportError unless llama.cpp's "gpt-2" pre-tokenizer tokenizes exactly as this tokenizer:
    BPE with GPT-2's byte-level regex, no normalizer, no prefix space, and no token added to encodings."""
    from tokenizers import Tokenizer
    with open(tokenizer_json, encoding="utf-8") as f:
        spec = json.load(f)
    pre = spec.get("pre_tokenizer") or {}
    if (spec["model"].get("type") != "BPE" or spec.get("normalizer") is not None
            or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space")):
        raise ExportError(f"{tokenizer_json} is not a GPT-2 style byte-level BPE without normalizer (as "
                          "tokenizer.py trains); llama.cpp would tokenize differently")
    tokenizer = Tokenizer.from_file(tokenizer_json)
    if tokenizer.encode("a b").ids != tokenizer.encode("a b", add_special_tokens=False).ids:
        raise ExportError(f"{tokenizer_json} adds special tokens to every encoding; tokenizer.py's never do")


def vocabulary(tokenizer_json, vocab_size):
    """Token strings (byte-level, as in tokenizer.json) and GGUF token types for ids 0..vocab_size-1."""
    import gguf
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(tokenizer_json)
    added = tokenizer.get_added_tokens_decoder()
    if tokenizer.get_vocab_size() > vocab_size:
        raise ExportError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
                          f"{vocab_size} embeddings")
    tokens, types = [], []
    for i in range(vocab_size):
        token = tokenizer.id_to_token(i)
        if token is None:  # embedding rows beyond the tokenizer's vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def rotate_half_to_interleaved(weight, n_heads):
    """Reorder the rows of each head of wq or wk (heads x head_dim rows) from HF's rotate-half pairing
    (i, i + head_dim/2) to llama.cpp's adjacent pairs (2i, 2i + 1): new row 2i is old row i, new row
    2i + 1 is old row i + head_dim/2."""
    rows, cols = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)


def gguf_tensors(weights, config):
    """(GGUF name, float32 array) for each checkpoint tensor, in llama.cpp's `llama` names and layout."""
    import gguf
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.n_layers)
    for hf_name, tensor in weights.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"model.safetensors has a tensor {hf_name} that a Llama model does not have")
        array = tensor.float().numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            array = rotate_half_to_interleaved(array, config.n_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            array = rotate_half_to_interleaved(array, config.n_kv_heads)
        yield name, array


def encode(array, outtype):
    """The array as stored for --outtype, and its GGML type: 1-D tensors stay f32; q8_0 needs rows that
    split into blocks of 32 and falls back to f16 otherwise."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
    qtype = GGMLQuantizationType[GGUF_TYPES[outtype]]
    if array.ndim == 1:
        qtype = GGMLQuantizationType.F32
    elif qtype == GGMLQuantizationType.Q8_0 and array.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        qtype = GGMLQuantizationType.F16
    return quants.quantize(array, qtype), qtype


def load(model_dir):
    """The model's config (model.ModelConfig) and its HF-named weights, or ExportError."""
    from safetensors.torch import load_file

    from model import load_config
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not os.path.isfile(os.path.join(model_dir, name)):
            raise ExportError(f"{model_dir} has no {name}; pass a model directory written by train_model.py")
    try:
        config = load_config(model_dir)
        weights = load_file(os.path.join(model_dir, "model.safetensors"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{model_dir} does not hold a readable Llama model: {e}") from e
    return config, weights


def export(model_dir, out_path, outtype="f16"):
    """Write the GGUF file; returns the number of tensors written."""
    import gguf
    config, weights = load(model_dir)
    tokenizer_json = os.path.join(model_dir, "tokenizer.json")
    check_gpt2_byte_level_bpe(tokenizer_json)
    tokens, token_types = vocabulary(tokenizer_json, config.vocab_size)
    # Merges, bos/eos/pad ids and the chat template, read by gguf from tokenizer.json, tokenizer_config.json,
    # chat_template.jinja and config.json as llama.cpp's converter reads them.
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=config.vocab_size)
    if special.chat_template:
        special.chat_template = GENERATION_TAGS.sub("", special.chat_template)
    special.add_special_token = {"bos": False, "eos": False}  # prompts are used as they are (checked above)

    tmp_path = f"{out_path}.tmp{os.getpid()}"
    writer = gguf.GGUFWriter(tmp_path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(os.path.basename(os.path.abspath(model_dir)))
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[outtype]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_dimension_count(config.dim // config.n_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    special.add_to_gguf(writer, quiet=True)
    count = 0
    for name, array in gguf_tensors(weights, config):
        data, qtype = encode(array, outtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
        count += 1
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp_path, out_path)  # a failed export leaves no half-written file under the name asked for
    except OSError as e:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise ExportError(f"cannot write {out_path}: {e.strerror or e}") from e
    return count


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory written by train_model.py")
    p.add_argument("--out", required=True, help="the GGUF file to write")
    p.add_argument("--outtype", default="f16", help="weight type of the matrices: f32, f16 or q8_0 "
                                                     "(norms stay f32)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.outtype not in GGUF_TYPES:
        sys.exit(f"error: unknown --outtype {args.outtype}; choose one of {', '.join(GGUF_TYPES)}")
    try:
        count = export(args.model, args.out, args.outtype)
    except ExportError as e:
        sys.exit(f"error: {e}")
    size = os.path.getsize(args.out)
    print(f"wrote {args.out}: {count} tensors, {args.outtype}, {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
