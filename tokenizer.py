"""Train a byte-level BPE tokenizer with ChatML special tokens and save it for `AutoTokenizer`.

Byte-level BPE with no normalizer: every string encodes and decodes back to itself, full-width
punctuation and emoji included. The corpus is sampled under a byte budget and streamed, so a corpus of
any size trains in bounded memory.
"""
import argparse
import math
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from corpus import DataError, data_files, parse_texts, read_records, text_bytes

END_OF_TEXT = "<|endoftext|>"  # separates documents in pretraining; also the bos token (see below)
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # ChatML; IM_END is also the eos token
PAD = "<|pad|>"  # a token of its own: padding must never be confused with eos
SPECIAL_TOKENS = [END_OF_TEXT, IM_START, IM_END, PAD]

# ChatML. The {% generation %} block marks what the model is trained to produce (the assistant's content,
# its tool calls and its closing <|im_end|>), so SFTDataset takes its loss mask from the template itself.
# Tools as Qwen2.5 and Hermes write them, which vLLM's hermes parser and llama.cpp read: the tools in the
# system turn, each call as <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call> in the
# assistant's turn, each result in a user turn of its own as <tool_response>\n...\n</tool_response>. The
# tools are listed as `name(parameter: description)：description`, not as their JSON schemas: a tokenizer
# trained on Chinese text spends a token on almost every ASCII character, and search_poems's schema alone
# took 337 tokens of a 512-token context. A call's arguments may be a JSON string (as OpenAI sends them) or
# an object.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{- '# 工具\n' }}"
    "{%- for tool in tools %}"
    "{%- set function = tool['function'] if tool['function'] is defined else tool %}"
    "{{- function['name'] + '(' }}"
    "{%- for name, parameter in ((function['parameters'] or {})['properties'] or {}).items() %}"
    "{{- ', ' if not loop.first }}{{- name }}"
    "{%- if parameter['description'] is defined %}{{- ': ' + parameter['description'] }}{%- endif %}"
    "{%- endfor %}"
    "{{- ')' }}{%- if function['description'] is defined %}{{- '：' + function['description'] }}{%- endif %}"
    "{{- '\n' }}"
    "{%- endfor %}"
    "{{- '调用工具：<tool_call>\n{\"name\": 工具名, \"arguments\": {参数名: 值}}\n</tool_call><|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\n' }}{%- generation %}{{- message['content'] or '' }}"
    "{%- for call in message['tool_calls'] or [] %}"
    "{%- set function = call['function'] if call['function'] is defined else call %}"
    "{{- '<tool_call>\n{\"name\": \"' + function['name'] + '\", \"arguments\": ' }}"
    "{%- if function['arguments'] is string %}{{- function['arguments'] }}"
    "{%- else %}{{- function['arguments'] | tojson }}{%- endif %}"
    "{{- '}\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>' }}{%- endgeneration %}{{- '\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{%- elif not (message['role'] == 'system' and loop.first and tools) %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


def sample_texts(paths, max_train_bytes):
    """Yield texts from the corpus (see dataset.data_files), keeping every k-th row so that about
    max_train_bytes are used."""
    total = sum(text_bytes(p) for p in data_files(paths))
    stride = max(1, math.ceil(total / max_train_bytes))
    used = 0
    for _, texts in read_records(paths, parse_texts, keep=lambda n: n % stride == 0):
        for text in texts:
            used += len(text.encode("utf-8"))
            yield text
    print(f"tokenizer trained on {used / 1e6:.1f} MB of text (1 row in {stride} of "
          f"{total / 1e6:.1f} MB of data; --max_train_bytes {max_train_bytes / 1e6:.0f} MB)")


def train_tokenizer(paths, vocab_size, max_train_bytes=100_000_000):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=sys.stderr.isatty())
    tokenizer.train_from_iterator(sample_texts(paths, max_train_bytes), trainer=trainer)
    # bos is <|endoftext|>: what precedes every pretraining document but the first, so it is the natural
    # prefix for tools that score a text from its start (lm-eval's rolling log-likelihood). It is declared,
    # never added: the post-processor adds no token, so encodings equal what training saw.
    # Left padding: batched generation in transformers needs it; training pads by itself (dataset.collate).
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=IM_END,
                                   pad_token=PAD, padding_side="left", chat_template=CHAT_TEMPLATE,
                                   model_max_length=1_000_000)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data_path", nargs="+", default=["data/pretrain_poetry.jsonl.gz"],
                        help="files (.jsonl, .jsonl.gz, .parquet) with text, messages or conversations, "
                             "directories of them or glob patterns")
    parser.add_argument("--vocab_size", type=int, default=6144)
    parser.add_argument("--out_dir", default="custom_tokenizer")
    parser.add_argument("--max_train_bytes", type=int, default=100_000_000,
                        help="sample the corpus down to about this many bytes. BPE training holds every "
                             "distinct word: about 70 bytes of memory per byte of Chinese text, so the "
                             "default 100 MB needs about 7 GB")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        tokenizer = train_tokenizer(args.data_path, args.vocab_size, args.max_train_bytes)
    except DataError as e:
        sys.exit(f"error: {e}")
    tokenizer.save_pretrained(args.out_dir)
    print(f"saved a tokenizer of {len(tokenizer)} tokens to {args.out_dir}/")


if __name__ == "__main__":
    main()
