"""Model directories as transformers uses them, and generate.py against transformers' `generate`.

train_model.py's directories must agree with themselves (config.json, generation_config.json and the
tokenizer name the same bos/eos/pad) and suit transformers' batched generation (left padding); generate.py
must stop where transformers' `generate` stops for the same model (generation_config's eos ids).
"""
import contextlib
import io
import itertools
import json
import math
import os

import pytest
import torch

from conftest import train_until_learnt, write_tiny_model

COMPLETION_PROMPT, COMPLETION = "春眠不觉晓，", "处处闻啼鸟。"  # learnt to end with <|im_end|>
QUESTION, ANSWER = "请背诵《静夜思》。", "床前明月光"  # learnt to end with <|endoftext|>


def _learnt_sequences(tokenizer):
    """Two token sequences the tiny model learns by heart: a completion that ends with <|im_end|>, and a
    chat answer that ends with <|endoftext|>; each followed by the other, so that neither stop token is
    the end of what the model has seen."""
    completion = tokenizer(COMPLETION_PROMPT + COMPLETION, add_special_tokens=False)["input_ids"] + \
        [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]
    chat = chat + tokenizer(ANSWER, add_special_tokens=False)["input_ids"] + \
        [tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    return completion, chat


def _shortfall(rows):
    """What the model lacks to have learnt rows: None once each of their next tokens has a probability
    above 3/4 (a loss under 0.29), so that greedy decoding from either prompt says the learnt text by a
    margin that rounding does not overturn; else the losses reached."""
    def shortfall(model):
        logits = model(rows).logits[:, :-1]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none")
        worst = losses.max().item()
        return None if worst < -math.log(0.75) else f"mean loss {losses.mean():.4f}, worst token's {worst:.4f}"
    return shortfall


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny model trained until it says both sequences, saved by checkpoints.write_model_dir."""
    completion, chat = _learnt_sequences(tokenizer)
    rows = torch.tensor([completion + chat, chat + completion])
    return write_tiny_model(tmp_path_factory.mktemp("generate") / "model", tokenizer, edit=lambda model:
                            train_until_learnt(model, itertools.repeat(rows), _shortfall(rows), max_steps=500))


@pytest.fixture(scope="module")
def hf_model(model_dir):
    """The directory in transformers, generation settings included (its eos ids are the oracle's)."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_config_generation_config_and_tokenizer_agree(model_dir):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config, generation = AutoConfig.from_pretrained(model_dir), GenerationConfig.from_pretrained(model_dir)
    end_of_text, im_end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>"))
    assert config.bos_token_id == generation.bos_token_id == tokenizer.bos_token_id == end_of_text
    assert config.eos_token_id == tokenizer.eos_token_id == im_end
    assert set(generation.eos_token_id) == {im_end, end_of_text}
    assert config.pad_token_id == generation.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.padding_side == "left"
    with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
        assert json.load(f)["padding_side"] == "left"


def test_batched_generation_in_transformers_equals_one_prompt_at_a_time(model_dir, hf_model):
    """What the saved left padding is for: prompts of different lengths generated together in
    transformers give each the tokens it gets alone (with right padding the shorter one would continue
    after its padding)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [COMPLETION_PROMPT, tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False)]
    batch = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    assert batch["attention_mask"].sum(1).tolist()[0] < batch["input_ids"].shape[1]  # one is padded
    with torch.no_grad():
        together = hf_model.generate(**batch, max_new_tokens=8, do_sample=False)[:, batch["input_ids"].shape[1]:]
        for row, prompt in enumerate(prompts):
            alone_input = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            alone = hf_model.generate(**alone_input, max_new_tokens=8, do_sample=False)
            alone = alone[0, alone_input["input_ids"].shape[1]:].tolist()
            assert together[row, :len(alone)].tolist() == alone, prompt


def _hf_new_text(hf_model, tokenizer, prompt_ids, max_new_tokens):
    """transformers' greedy continuation with the model's own generation settings, and its new ids."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                                dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, len(prompt_ids):].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), new


def _generate_py(*argv):
    import generate
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        generate.main([*argv, "--temperature", "0", "--device", "cpu"])
    return printed.getvalue()


def test_prompt_stops_at_im_end_where_transformers_stops(model_dir, hf_model):
    """A completion (no --chat) of an SFT model ends at <|im_end|>, as transformers' generate does."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = tokenizer(COMPLETION_PROMPT, add_special_tokens=False)["input_ids"]
    expected, new = _hf_new_text(hf_model, tokenizer, prompt_ids, 30)
    assert new[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") and len(new) < 30  # the oracle stopped
    assert expected == COMPLETION
    assert _generate_py("--model", model_dir, "--prompt", COMPLETION_PROMPT, "--max_new_tokens", "30") == \
        expected + "\n"


def test_chat_stops_at_endoftext_where_transformers_stops(model_dir, hf_model):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"]
    expected, new = _hf_new_text(hf_model, tokenizer, prompt_ids, 30)
    assert new[-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>") and len(new) < 30
    assert expected == ANSWER
    assert _generate_py("--model", model_dir, "--chat", "--prompt", QUESTION, "--max_new_tokens", "30") == \
        expected + "\n"


def test_stop_ids_without_a_generation_config_are_the_tokenizers_eos(model_dir, tmp_path):
    """A plain Llama directory without generation_config.json: transformers stops at config.json's eos."""
    import shutil

    import generate
    from transformers import AutoTokenizer
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    os.remove(plain / "generation_config.json")
    tokenizer = AutoTokenizer.from_pretrained(plain)
    assert generate.stop_ids(str(plain), tokenizer) == [tokenizer.eos_token_id]
    assert set(generate.stop_ids(model_dir, tokenizer)) == {tokenizer.eos_token_id,
                                                       tokenizer.convert_tokens_to_ids("<|endoftext|>")}
