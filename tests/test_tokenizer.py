"""The shipped tokenizer and tokenizer.py's training: special tokens, lossless round trips, ChatML."""
import os

import pytest

from conftest import DATA_DIR, TOKENIZER_DIR, shipped_lines, write_jsonl

ROUND_TRIP = {
    "chinese_poetry": "《静夜思》 李白\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
    "full_width_punctuation": "，。！？“”《》：；（）　‘’【】、…—～「」『』",
    "full_width_space_runs": "春眠　不觉晓　　处处闻啼鸟\u3000",
    "english": "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it?",
    "python_code": "def f(x):\n\tif x:\n\t\treturn [i ** 2 for i in range(x)]  # squares\n\treturn None\n",
    "emoji": "😀🎉 👍🏽 👩‍💻 👨‍👩‍👧‍👦 🏳️‍🌈 🇨🇳 ❤️",
    "mixed_whitespace": "  leading\t\ttabs \r\n\r\nblank lines   \n trailing  \u00a0nbsp ",
    "mixed_scripts": "Tiny-LLM 训练 ✓ naïve café Ünïcödé ½ ² ∑ αβγ ありがとう 한국어",
    "special_lookalikes": "<|im_start <im_end|> <|pad |> | < > endoftext",
}


def test_loads_with_auto_tokenizer(tokenizer):
    from transformers import AutoTokenizer, PreTrainedTokenizerBase
    again = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    assert isinstance(again, PreTrainedTokenizerBase)
    assert again.is_fast
    assert len(again) == len(tokenizer) > 1000


def test_eos_and_pad(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.pad_token is not None
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.pad_token_id != tokenizer.convert_tokens_to_ids("<|endoftext|>")


@pytest.mark.parametrize("token", ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>"])
def test_chatml_tokens_are_single_special_tokens(tokenizer, token):
    token_id = tokenizer.convert_tokens_to_ids(token)
    assert token_id is not None and token_id != tokenizer.unk_token_id
    assert tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id]
    assert tokenizer.added_tokens_decoder[token_id].content == token
    assert tokenizer.added_tokens_decoder[token_id].special
    # Inside text too it stays one token, and skip_special_tokens drops it.
    ids = tokenizer(f"诗{token}词", add_special_tokens=False)["input_ids"]
    assert ids.count(token_id) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "诗词"
    assert tokenizer.decode(ids) == f"诗{token}词"


def _assert_bos_is_declared_never_added(tok):
    """bos is <|endoftext|> (the document separator: what precedes every pretraining document but the first),
    and declaring it changes no encoding: neither plain text nor the chat template gets a bos, so training
    data stay token for token what they were. Left padding, for batched generation in transformers."""
    assert tok.bos_token == "<|endoftext|>"
    assert tok.bos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    for text in ("x", "床前明月光"):
        ids = tok(text)["input_ids"]
        assert ids == tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text, add_special_tokens=False)
        assert tok.bos_token_id not in ids
    chat = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert chat == tok(_chatml(CONVERSATION), add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id not in chat
    assert tok.padding_side == "left"


def test_bos_is_endoftext_and_never_added(tokenizer):
    _assert_bos_is_declared_never_added(tokenizer)


def test_plain_text_adds_no_special_tokens(tokenizer):
    """Neither a bos nor an eos sneaks in: pretraining adds <|endoftext|> itself."""
    ids = tokenizer("床前明月光")["input_ids"]
    assert ids == tokenizer("床前明月光", add_special_tokens=False)["input_ids"]
    specials = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>",
                                                            "<|pad|>")}
    assert not specials & set(ids)


def _assert_round_trips(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.unk_token_id is None or tok.unk_token_id not in ids


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_round_trip(tokenizer, name):
    _assert_round_trips(tokenizer, ROUND_TRIP[name])


def test_round_trip_of_shipped_text_and_its_compression(tokenizer):
    texts = [r["text"] for r in shipped_lines("pretrain_poetry.jsonl.gz", 50)]
    n_tokens = n_chars = 0
    for text in texts:
        _assert_round_trips(tokenizer, text)
        n_tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        n_chars += len(text)
    # A BPE trained on this corpus: fewer tokens than characters (each CJK character is 3 bytes).
    assert n_tokens < n_chars


def test_batch_decode_round_trip(tokenizer):
    texts = list(ROUND_TRIP.values())
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert tokenizer.batch_decode(encoded) == texts


# --- chat template ---------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "你是一个熟读古诗词的AI助手。"},
    {"role": "user", "content": "请背诵《静夜思》。"},
    {"role": "assistant", "content": "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"},
    {"role": "user", "content": "作者是谁？"},
    {"role": "assistant", "content": "李白。"},
]


def _chatml(messages):
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def test_chat_template_renders_chatml(tokenizer):
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == _chatml(CONVERSATION)
    assert tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False) == (
        "<|im_start|>system\n你是一个熟读古诗词的AI助手。<|im_end|>\n"
        "<|im_start|>user\n请背诵《静夜思》。<|im_end|>\n")


def test_chat_template_generation_prompt(tokenizer):
    prompt = CONVERSATION[:4]
    rendered = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert rendered == _chatml(prompt) + "<|im_start|>assistant\n"
    assert tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=False) == _chatml(prompt)


def test_chat_template_tokens_equal_tokenized_rendering(tokenizer):
    ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert ids == tokenizer(_chatml(CONVERSATION), add_special_tokens=False)["input_ids"]
    im_start, im_end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    assert ids.count(im_start) == ids.count(im_end) == len(CONVERSATION)


# --- training a tokenizer ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    import tokenizer as tokenizer_py
    folder = tmp_path_factory.mktemp("fresh_tokenizer")
    pretrain = write_jsonl(folder / "pretrain.jsonl", shipped_lines("pretrain_poetry.jsonl.gz", 300))
    sft = write_jsonl(folder / "sft.jsonl", shipped_lines("sft_poetry.jsonl.gz", 200))
    belle = write_jsonl(folder / "belle.jsonl", shipped_lines("sft_poetry_belle.jsonl.gz", 100))
    fresh = tokenizer_py.train_tokenizer([pretrain, sft, belle], vocab_size=400)
    out = folder / "out"
    fresh.save_pretrained(str(out))
    return str(out)


def test_trained_tokenizer_loads_with_auto_tokenizer(trained_dir):
    from transformers import AutoTokenizer
    fresh = AutoTokenizer.from_pretrained(trained_dir)
    assert os.path.isfile(os.path.join(trained_dir, "tokenizer.json"))
    assert 256 + 4 < len(fresh) <= 400
    assert fresh.eos_token == "<|im_end|>"
    assert fresh.pad_token == "<|pad|>" and fresh.pad_token_id != fresh.eos_token_id
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"):
        token_id = fresh.convert_tokens_to_ids(token)
        assert fresh(token, add_special_tokens=False)["input_ids"] == [token_id]
        assert fresh.added_tokens_decoder[token_id].special
    assert fresh.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == \
        _chatml(CONVERSATION) + "<|im_start|>assistant\n"


def test_trained_tokenizer_declares_bos_and_left_padding(trained_dir):
    from transformers import AutoTokenizer
    _assert_bos_is_declared_never_added(AutoTokenizer.from_pretrained(trained_dir))


def _assistant_mask_text(tok, messages):
    encoded = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    return tok.decode([t for t, m in zip(ids, mask) if m]), tok.decode([t for t, m in zip(ids, mask) if not m])


def test_trained_tokenizer_marks_what_the_assistant_says(trained_dir, tokenizer):
    """The template of a freshly trained tokenizer gives SFT its loss mask: each assistant content and its
    <|im_end|>, and nothing of the system or user turns; the same as the shipped tokenizer's."""
    from transformers import AutoTokenizer
    fresh = AutoTokenizer.from_pretrained(trained_dir)
    expected_labelled = "".join(m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant")
    expected_rest = "".join(f"<|im_start|>{m['role']}\n" + ("\n" if m["role"] == "assistant" else
                                                            f"{m['content']}<|im_end|>\n") for m in CONVERSATION)
    for tok in (fresh, tokenizer):
        assert _assistant_mask_text(tok, CONVERSATION) == (expected_labelled, expected_rest)


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_trained_tokenizer_round_trips(trained_dir, name):
    from transformers import AutoTokenizer
    _assert_round_trips(AutoTokenizer.from_pretrained(trained_dir), ROUND_TRIP[name])


def test_trained_tokenizer_learns_from_the_text_fields_of_every_format(trained_dir, tmp_path):
    """Merges come from `text`, `messages` contents and `conversations` values, not from JSON syntax."""
    import tokenizer as tokenizer_py
    poem = shipped_lines("pretrain_poetry.jsonl.gz", 1)[0]["text"]
    from transformers import AutoTokenizer
    fresh = AutoTokenizer.from_pretrained(trained_dir)
    assert len(fresh(poem, add_special_tokens=False)["input_ids"]) < len(poem.encode("utf-8"))

    pretrain = write_jsonl(tmp_path / "a.jsonl", [{"text": "kkkk"}] * 30)
    sft = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "qqqq"},
                                                           {"role": "assistant", "content": "zzzz"}]}] * 30)
    belle = write_jsonl(tmp_path / "c.jsonl", [{"conversations": [{"from": "human", "value": "wwww"},
                                                                  {"from": "gpt", "value": "jjjj"}]}] * 30)
    tiny = tokenizer_py.train_tokenizer([pretrain, sft, belle], vocab_size=300)
    for word in ("kkkk", "qqqq", "zzzz", "wwww", "jjjj"):
        assert len(tiny(word, add_special_tokens=False)["input_ids"]) == 1, word
    for key in ("messages", "content", "conversations", "value"):
        assert len(tiny(key, add_special_tokens=False)["input_ids"]) == len(key), key


def _bytes_used(paths, max_train_bytes):
    import tokenizer as tokenizer_py
    return sum(len(text.encode("utf-8")) for text in tokenizer_py.sample_texts(paths, max_train_bytes))


def test_max_train_bytes_samples_the_corpus(tmp_path, capsys):
    path = write_jsonl(tmp_path / "pretrain.jsonl", shipped_lines("pretrain_poetry.jsonl.gz", 1000))
    everything = _bytes_used([path], 10**12)
    assert everything == sum(len(r["text"].encode("utf-8"))
                             for r in shipped_lines("pretrain_poetry.jsonl.gz", 1000))
    budget = -(-os.path.getsize(path) // 4)  # a quarter, rounded up: every 4th line
    used = _bytes_used([path], budget)
    assert used <= budget
    assert used == pytest.approx(everything / 4, rel=0.1)
    assert "MB" in capsys.readouterr().out  # it says how much it used


def test_max_train_bytes_is_passed_on_by_train_tokenizer(tmp_path, monkeypatch):
    import tokenizer as tokenizer_py
    path = write_jsonl(tmp_path / "pretrain.jsonl", shipped_lines("pretrain_poetry.jsonl.gz", 500))
    original, seen = tokenizer_py.sample_texts, []

    def spy(paths, max_train_bytes):
        for text in original(paths, max_train_bytes):
            seen.append(len(text.encode("utf-8")))
            yield text

    monkeypatch.setattr(tokenizer_py, "sample_texts", spy)
    budget = -(-os.path.getsize(path) // 5)
    tokenizer_py.train_tokenizer([path], vocab_size=300, max_train_bytes=budget)
    assert 0 < sum(seen) <= budget
    assert len(seen) == pytest.approx(500 / 5, abs=2)


def test_max_train_bytes_counts_text_of_gzipped_files():
    """The budget is about the bytes of text trained on; a .jsonl.gz file holds about twice its size in
    text here (gzip), so its on-disk size must not stand in for the size of its content."""
    path = os.path.join(DATA_DIR, "pretrain_poetry.jsonl.gz")
    budget = 500_000
    used = _bytes_used([path], budget)
    assert used <= 1.2 * budget, f"sampled {used} bytes of text for a budget of {budget}"


def test_max_train_bytes_with_a_file_shorter_than_the_stride(tmp_path):
    """A small file next to a big one may contribute no line to the sample; that is no reason to stop
    with "no valid sample (the file is empty)": the file is neither empty nor invalid."""
    import tokenizer as tokenizer_py
    big = write_jsonl(tmp_path / "big.jsonl", shipped_lines("pretrain_poetry.jsonl.gz", 1000))
    small = write_jsonl(tmp_path / "sft_small.jsonl", shipped_lines("sft_poetry.jsonl.gz", 3))
    budget = (os.path.getsize(big) + os.path.getsize(small)) // 10  # keeps every 10th or 11th line
    fresh = tokenizer_py.train_tokenizer([big, small], vocab_size=300, max_train_bytes=budget)
    _assert_round_trips(fresh, ROUND_TRIP["chinese_poetry"])
