"""Sample from a trained model: one completion, or a multi-turn chat that streams its answer.

    python generate.py --model base_model --prompt "《静夜思》 李白"
    python generate.py --model sft_model --chat                      (interactive; empty line or Ctrl-D ends)
    python generate.py --model sft_model --chat --prompt "请背诵《静夜思》"   (one chat turn)
    python generate.py --model tool_model --chat --tools search_poems      (the model may search the poems)

Only the new text goes to stdout. Generation stops where transformers' `generate` stops for the model: at
any id of its generation_config.json's eos_token_id (<|im_end|> and <|endoftext|> for our models).
"""
import argparse
import json
import os
import sys

import torch

from hardware import add_dtype_argument, autocast, choose_dtype, warn_if_emulated
from model import Transformer
from tools import BUILT_IN, MAX_TOOL_CALLS, parse_tool_calls, run_tool, tool_schemas


class TextStreamer:
    """Prints new text as tokens arrive; holds back bytes of a character that is not complete yet."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out if out is not None else sys.stdout
        self.ids, self.printed = [], 0

    def __call__(self, token_ids):
        self.ids.append(int(token_ids[0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)


def load(model_dir, device):
    from transformers import AutoTokenizer
    if not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        sys.exit(f"error: {model_dir} holds no model.safetensors; pass a directory written by train_model.py")
    model = Transformer.from_pretrained(model_dir).to(device).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def stop_ids(model_dir, tokenizer):
    """The ids transformers' `generate` stops at for this model: generation_config.json's eos_token_id (one
    id or a list), else the tokenizer's eos."""
    from transformers import GenerationConfig
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    if eos is None:
        eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def reply(model, tokenizer, messages, args, stops, stream=True):
    """The assistant's answer to the conversation so far, streamed to stdout when `stream`. With --tools, a
    call the answer makes runs, its result joins the conversation (shown to the user) and the model goes
    on, up to --max_tool_calls times; the messages of the calls and results are appended to `messages`."""
    tools = tool_schemas(args.tools.split(",")) if args.tools else None
    for _ in range(args.max_tool_calls + 1 if tools else 1):
        prompt = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        new_ids = complete(model, tokenizer, prompt, args, stops, TextStreamer(tokenizer) if stream else None)
        answer = tokenizer.decode(new_ids, skip_special_tokens=True)
        content, calls, malformed = parse_tool_calls(answer, {t["function"]["name"] for t in tools or []})
        if not calls or malformed:
            return answer
        messages.append(call_message(content, calls))
        for call, sent in zip(calls, messages[-1]["tool_calls"]):
            result = run_tool(call["name"], call["arguments"])
            messages.append({"role": "tool", "tool_call_id": sent["id"], "content": result})
            if stream:
                print(f"\n<tool_response>\n{result}\n</tool_response>", flush=True)
    return answer


def call_message(content, calls):
    """The assistant message of a turn that calls tools, in OpenAI's form (ids, arguments as JSON)."""
    return {"role": "assistant", "content": content, "tool_calls": [
        {"id": f"call_{i}", "type": "function",
         "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
        for i, c in enumerate(calls)]}


def complete(model, tokenizer, prompt_ids, args, stops, streamer=None):
    """New token ids after prompt_ids (a list): up to and including the first id in `stops`, or
    max_new_tokens of them."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out = model.generate(input_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, eos_token_id=stops, streamer=streamer, compile=args.compile)
    return out[0, len(prompt_ids):].tolist()


def chat(model, tokenizer, args, stops):
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: type a message; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        answer = reply(model, tokenizer, messages, args, stops)
        print()
        messages.append({"role": "assistant", "content": answer})


def eos_rate(model, tokenizer, data_path, args, stops, prompts=20):
    """Share of held-out conversations whose answer, sampled with args' settings and stopped as the chat
    stops (at any of `stops`), ends with <|im_end|> by itself within args.max_new_tokens.

    Held out: the SFT validation lines that train_model.py never trains on; the prompt is each
    conversation up to its last user turn.
    """
    from dataset import SFTDataset
    held_out = SFTDataset(data_path, tokenizer, max_length=model.config.max_seq_len, split="val")
    ended = asked = 0
    for _, (messages, _tools) in held_out.records():
        prompt_messages = messages[:max(i for i, m in enumerate(messages) if m["role"] == "assistant")]
        prompt = tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        new_ids = complete(model, tokenizer, prompt, args, stops)
        ended += tokenizer.eos_token_id in new_ids
        asked += 1
        if asked == prompts:
            break
    return ended / asked, asked


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory written by train_model.py")
    p.add_argument("--prompt", default=None, help="text to complete (with --chat: one user message)")
    p.add_argument("--chat", action="store_true", help="use the chat template; without --prompt, interactive")
    p.add_argument("--system", default=None, help="system prompt for --chat")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--eos_check", default=None, metavar="SFT_JSONL",
                   help="report how often answers to 20 held-out prompts end with <|im_end|>")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_dtype_argument(p, "generate")
    p.add_argument("--tools", default=None, metavar="NAMES",
                   help=f"--chat with these built-in tools, comma-separated ({', '.join(BUILT_IN)}): the model's "
                        "calls run and their results go back to it")
    p.add_argument("--max_tool_calls", type=int, default=MAX_TOOL_CALLS, help="tool calls per answer at most")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoding step: about twice the tokens/s on CPU, after 5-20 s of "
                        "compiling on first use (once more when the context length first changes)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    unknown = [name for name in (args.tools or "").split(",") if name and name not in BUILT_IN]
    if unknown:
        sys.exit(f"error: --tools: no built-in tool {', '.join(unknown)}; there is {', '.join(BUILT_IN)}")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = load(args.model, args.device)
    device = next(model.parameters()).device
    dtype, _ = choose_dtype(device, args.dtype, job="decode")
    warn_if_emulated(device, dtype)
    with autocast(device, dtype):
        run(model, tokenizer, args, stop_ids(args.model, tokenizer))


def run(model, tokenizer, args, stops):
    """What the arguments ask for: the eos check, a chat, one chat turn, or one completion."""
    if args.eos_check:
        rate, asked = eos_rate(model, tokenizer, args.eos_check, args, stops)
        how = "greedy" if args.temperature == 0 else f"temperature {args.temperature}"
        print(f"the model ended its answer with <|im_end|> by itself on {rate:.0%} of {asked} held-out "
              f"prompts (within {args.max_new_tokens} new tokens, {how})")
    elif args.chat and args.prompt is None:
        chat(model, tokenizer, args, stops)
    elif args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        reply(model, tokenizer, messages + [{"role": "user", "content": args.prompt}], args, stops)
        print()
    elif args.prompt is not None:
        prompt = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
        complete(model, tokenizer, prompt, args, stops, TextStreamer(tokenizer))
        print()
    else:
        sys.exit("error: pass --prompt TEXT, or --chat for a conversation")


if __name__ == "__main__":
    main()
