"""Tool calling: the chat template against a conversation rendered by hand (transformers' apply_chat_template
renders it), the loss mask of a tool conversation, bad tool rows, the call parser, and search_poems."""
import json
import os

import pytest
import torch

from conftest import TINY_MODEL_ARGS, run_main, shipped_lines, write_jsonl

SEARCH = {"type": "function", "function": {"name": "search_poems", "description": "搜索诗词",
                                           "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                                                          "required": ["query"]}}}
CONVERSATION = [
    {"role": "system", "content": "你是诗词助手。"},
    {"role": "user", "content": "《静夜思》的作者是谁？"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "search_poems", "arguments": '{"query": "静夜思"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "《静夜思》 李白\n床前明月光，疑是地上霜。"},
    {"role": "assistant", "content": "《静夜思》的作者是李白。"},
]
BY_HAND = (
    "<|im_start|>system\n你是诗词助手。\n\n# 工具\nsearch_poems(query)：搜索诗词\n"
    '调用工具：<tool_call>\n{"name": 工具名, "arguments": {参数名: 值}}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\n《静夜思》的作者是谁？<|im_end|>\n"
    '<|im_start|>assistant\n<tool_call>\n{"name": "search_poems", "arguments": {"query": "静夜思"}}\n</tool_call>'
    "<|im_end|>\n"
    "<|im_start|>user\n<tool_response>\n《静夜思》 李白\n床前明月光，疑是地上霜。\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n《静夜思》的作者是李白。<|im_end|>\n"
)


def test_the_template_renders_tools_calls_and_results_as_written_by_hand(tokenizer):
    assert tokenizer.apply_chat_template(CONVERSATION, tools=[SEARCH], tokenize=False) == BY_HAND
    as_object = json.loads(json.dumps(CONVERSATION))
    as_object[2]["tool_calls"][0]["function"]["arguments"] = {"query": "静夜思"}  # an object, not a JSON string
    assert tokenizer.apply_chat_template(as_object, tools=[SEARCH], tokenize=False) == BY_HAND
    plain = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    assert tokenizer.apply_chat_template(plain, tokenize=False) == \
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n你好！<|im_end|>\n"  # as before tools


def test_the_loss_mask_of_a_tool_conversation_is_the_calls_and_answers_only(tokenizer):
    from corpus import parse_chat
    from dataset import encode_conversation
    messages, tools = parse_chat({"tools": [SEARCH], "messages": CONVERSATION})
    sample = encode_conversation(tokenizer, messages, 4096, tools)
    labelled = tokenizer.decode([t for t in sample["labels"].tolist() if t != -100])
    assert labelled == ('<tool_call>\n{"name": "search_poems", "arguments": {"query": "静夜思"}}\n</tool_call>'
                        "<|im_end|>《静夜思》的作者是李白。<|im_end|>")


def tool_rows():
    """Tool conversations, then ordinary SFT rows: a file to train on."""
    row = {"tools": [SEARCH], "messages": CONVERSATION}
    return [row] * 50 + shipped_lines("sft_poetry.jsonl.gz", 350)


@pytest.mark.parametrize("bad,message", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "delete_poems", "arguments": "{}"}}]}]},
     "a call to 'delete_poems', which is not among the row's tools (search_poems)"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "search_poems", "arguments": "{query: 1"}}]}]},
     "the arguments of a call to search_poems are not JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "result"},
                   {"role": "assistant", "content": "a"}]},
     "a tool turn that answers no call"),
])
def test_bad_tool_rows_are_named(bad, message, tmp_path, base_model):
    rows = tool_rows()
    rows.insert(2, {"tools": [SEARCH], **bad})
    data = write_jsonl(tmp_path / "sft_tools.jsonl", rows)
    argv = ["--data_path", data, "--out_dir", tmp_path / "out", *TINY_MODEL_ARGS, "--init_from", base_model,
            "--max_steps", "1", "--batch_size", "2", "--eval_batches", "1", "--save_interval", "0"]
    error = run_main([*argv, "--strict"])
    assert error.startswith(f"error: {data}:3: {message}") and error.endswith("(--strict stops at the first bad line)")


def test_a_tokenizer_whose_template_renders_no_tools_is_named(tmp_path, tokenizer, base_model):
    old = tmp_path / "old_tokenizer"
    tokenizer.save_pretrained(str(old))
    (old / "chat_template.jinja").write_text(
        "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}{%- if message['role'] == "
        "'assistant' %}{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
        "{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}")
    data = write_jsonl(tmp_path / "sft_tools.jsonl", tool_rows()[:50] * 8)  # every batch holds a tool conversation
    error = run_main(["--data_path", data, "--out_dir", tmp_path / "out", *TINY_MODEL_ARGS, "--tokenizer_path", old,
                      "--init_from", base_model, "--max_steps", "1", "--batch_size", "2", "--eval_batches", "1"])
    assert isinstance(error, str) and "its chat template renders no tools" in error and "\n" not in error


def test_sft_on_tool_conversations_trains(tmp_path, base_model):
    data = write_jsonl(tmp_path / "sft_tools.jsonl", tool_rows())
    out = tmp_path / "out"
    assert run_main(["--data_path", data, "--out_dir", out, *TINY_MODEL_ARGS, "--init_from", base_model,
                     "--max_steps", "2", "--batch_size", "4", "--eval_batches", "1", "--save_interval", "0"]) is None
    assert os.path.isfile(out / "model.safetensors")


# --- parsing calls ---------------------------------------------------------------------------------------

def test_calls_are_parsed_and_malformed_ones_are_told_apart():
    from tools import parse_tool_calls
    text = '好的。<tool_call>\n{"name": "search_poems", "arguments": {"query": "静夜思"}}\n</tool_call>'
    assert parse_tool_calls(text, {"search_poems"}) == ("好的。", [{"name": "search_poems",
                                                                     "arguments": {"query": "静夜思"}}], False)
    two = text + '<tool_call>{"name": "search_poems", "arguments": {"query": "春晓"}}</tool_call>'
    assert [c["arguments"]["query"] for c in parse_tool_calls(two, {"search_poems"})[1]] == ["静夜思", "春晓"]
    for broken in ('<tool_call>{"name": "search_poems", "arguments": {"query": </tool_call>',
                   '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
                   '<tool_call>["search_poems"]</tool_call>'):
        assert parse_tool_calls(broken, {"search_poems"})[2], broken
    assert parse_tool_calls("没有调用。", {"search_poems"}) == ("没有调用。", [], False)


# --- search_poems ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def index(tmp_path_factory):
    from build_rl_data import write_gzip_jsonl
    from tools import PoemIndex
    path = tmp_path_factory.mktemp("index") / "poems.jsonl.gz"
    write_gzip_jsonl(str(path), [
        {"title": "静夜思", "author": "李白", "text": "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"},
        {"title": "渔家傲", "author": "范仲淹", "text": "塞下秋来风景异，衡阳雁去无留意。"},
        {"title": "渔家傲", "author": "欧阳修", "text": "花底忽闻敲两桨，逡巡女伴来寻访。"},
        {"title": "春晓", "author": "孟浩然", "text": "春眠不觉晓，处处闻啼鸟。"},
        {"title": "雪", "author": "罗隐", "text": "尽道丰年瑞，丰年事若何。"},
        {"title": "虫豸诗  一", "author": "元稹", "text": "阴深山有瘴，湿垫草多蝱。"},
        {"title": "虫豸诗  二", "author": "元稹", "text": "梨笑清都月，蜂游紫殿春。"}])
    return PoemIndex(str(path))


def test_search_finds_titles_lines_and_short_titles(index):
    from tools import format_matches
    assert index.search("《静夜思》")[0][:2] == ("静夜思", "李白")
    assert index.search("“疑是地上霜”")[0][:2] == ("静夜思", "李白")  # a quoted line
    assert index.search("雪")[0][:2] == ("雪", "罗隐")  # one character: no trigram, an exact title
    assert {a for _, a, _ in index.search("渔家傲")} == {"范仲淹", "欧阳修"}  # every poet of a shared title
    assert index.search("不存在的诗题") == []
    assert index.search("虫豸诗  二")[0][:2] == ("虫豸诗  二", "元稹")  # a title with two spaces, as written
    text = format_matches("静夜思", index.search("静夜思"))
    assert text.startswith("《静夜思》 作者：李白\n床前明月光") and "低头思故乡" in text  # the best match whole
    both = format_matches("渔家傲", index.search("渔家傲"))
    assert both.count("渔家傲") == 2 and both.count("《") == both.count("作者：") == 1  # the header once


def test_the_shipped_index_finds_a_held_out_poem_by_its_title():
    """The index holds the held-out poems too (the tool's knowledge), and the held-out questions ask about
    titles the training conversations never mention."""
    from tools import search_poems
    with open(os.path.join(os.path.dirname(__file__), "..", "tasks", "poetry_tools.jsonl"), encoding="utf-8") as f:
        items = [json.loads(line) for line in f]
    for item in items[:20]:
        assert search_poems(item["title"]).splitlines()[0] == f"《{item['title']}》 作者：{item['author']}", item


def test_tool_answers_are_scored_by_the_author_or_the_poem_character_for_character():
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tasks"))
    from poetry_data import tool_answer_scores
    who = {"kind": "title", "title": "静夜思", "author": "李白", "answer": "李白"}
    assert tool_answer_scores(who, ["《静夜思》 作者：李白。"]) == {"right": 1.0}
    assert tool_answer_scores(who, ["《静夜思》 作者：杜甫。"]) == {"right": 0.0}
    recite = {"kind": "recite", "title": "静夜思", "author": "李白", "answer": "床前明月光，疑是地上霜。"}
    for answer, right in [("床前明月光，疑是地上霜。", 1.0), ("床前明月光疑是地上霜", 1.0),  # punctuation aside
                          ("《静夜思》 作者：李白\n床前明月光，疑是地上霜。", 1.0),  # the result's header first
                          ("《春晓》 作者：孟浩然\n床前明月光，疑是地上霜。", 0.0),  # another poem's
                          ("床前明月光，疑是地上霜。举头望明月。", 0.0), ("床前明月光，疑是地下霜。", 0.0)]:
        assert tool_answer_scores(recite, [answer]) == {"right": right}, answer


def test_the_shipped_copy_drills_repeat_openings_of_the_shipped_sample():
    """data/copy_drills.jsonl.gz: each poem of the pretraining sample (training text, never a held-out poem),
    its opening of 10 to 60 characters written two or three times, a copy a line."""
    sample, drills = shipped_lines("pretrain_poetry.jsonl.gz", None), shipped_lines("copy_drills.jsonl.gz", None)
    assert len(drills) == len(sample) == 20000
    for poem, drill in zip(sample, drills):
        text = drill["text"]
        assert any(text == "\n".join([poem["text"][:n]] * copies) for copies in (2, 3) for n in range(10, 61)), text


def test_the_shipped_tool_answers_repeat_the_results_header():
    """Who wrote it: the answer holds the result's first line, "《title》 作者：author", so the model copies the
    name after the same tokens it follows in the result."""
    rows = shipped_lines("sft_tools.jsonl.gz", None)
    answered = [(row["messages"][-2]["content"].splitlines()[0], row["messages"][-1]["content"]) for row in rows
                if row["messages"][-2]["role"] == "tool" and "作者：" in row["messages"][-1]["content"]]
    assert len(answered) > 3000
    assert all(header.startswith("《") and " 作者：" in header and header in answer for header, answer in answered)


# --- the OpenAI protocol: serve.py with a scripted model ---------------------------------------------------

class ScriptedScheduler:
    """serve.Scheduler's interface, answering every request with the next of `answers`, in pieces of 3
    characters (as streamed tokens arrive); the prompts it got are kept."""

    def __init__(self, answers):
        self.answers, self.prompts, self.device = list(answers), [], torch.device("cpu")

    def submit(self, sequence):
        self.prompts.append(sequence.prompt_ids)
        text = self.answers.pop(0)
        for start in range(0, len(text), 3):
            sequence.post("text", text[start:start + 3])
        sequence.post("end", "stop", {"prompt_tokens": len(sequence.prompt_ids), "completion_tokens": 1,
                                      "total_tokens": len(sequence.prompt_ids) + 1})

    def stats(self):
        return {"running": 0, "waiting": 0, "finished": {}}


CALL_TEXT = '<tool_call>\n{"name": "search_poems", "arguments": {"query": "静夜思"}}\n</tool_call>'


def scripted_client(tokenizer, answers, built_in=()):
    """(an openai.AsyncOpenAI client of serve.py's app on a ScriptedScheduler, the scheduler)."""
    import httpx
    import openai
    from serve import create_app
    scheduler = ScriptedScheduler(answers)
    app = create_app(scheduler, tokenizer, "tiny", 1024, built_in_tools=built_in)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="none", http_client=http, max_retries=0), scheduler


def ask(client, stream=False, **kwargs):
    import asyncio

    async def request():
        answer = await client.chat.completions.create(
            model="tiny", messages=kwargs.pop("messages", [{"role": "user", "content": "《静夜思》的作者是谁？"}]),
            stream=stream, **kwargs)
        if not stream:
            return answer
        return [chunk async for chunk in answer]
    return asyncio.run(request())


def test_a_call_comes_back_as_tool_calls(tokenizer):
    client, scheduler = scripted_client(tokenizer, [CALL_TEXT])
    answer = ask(client, tools=[SEARCH])
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls" and not message.content
    (call,) = message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "search_poems"
    assert json.loads(call.function.arguments) == {"query": "静夜思"}
    prompt = tokenizer.decode(scheduler.prompts[0])
    assert "# 工具\nsearch_poems(" in prompt  # the model saw the tool


def test_a_streamed_call_comes_as_tool_call_deltas(tokenizer):
    client, _ = scripted_client(tokenizer, ["好的。" + CALL_TEXT])
    chunks = ask(client, stream=True, tools=[SEARCH])
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert content == "好的。" and "<tool" not in content  # the markup never reaches the user as text
    assert deltas[0].function.name == "search_poems" and deltas[0].id.startswith("call_")
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"query": "静夜思"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("text", ['<tool_call>{"name": "search_poems", "arguments": {"query": </tool_call>',
                                  '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'])
@pytest.mark.parametrize("stream", [False, True])
def test_a_malformed_call_comes_back_as_plain_content(tokenizer, text, stream):
    client, _ = scripted_client(tokenizer, [text])
    answer = ask(client, stream=stream, tools=[SEARCH])
    if stream:
        content = "".join(c.choices[0].delta.content or "" for c in answer if c.choices)
        finish = answer[-1].choices[0].finish_reason
    else:
        content, finish = answer.choices[0].message.content, answer.choices[0].finish_reason
    assert content == text and finish == "stop"


def test_the_conversation_goes_on_after_a_tool_message(tokenizer):
    client, scheduler = scripted_client(tokenizer, ["《静夜思》的作者是李白。"])
    messages = [{"role": "user", "content": "《静夜思》的作者是谁？"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "search_poems", "arguments": '{"query": "静夜思"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "《静夜思》 李白\n床前明月光"}]
    answer = ask(client, tools=[SEARCH], messages=messages)
    assert answer.choices[0].message.content == "《静夜思》的作者是李白。"
    prompt = tokenizer.decode(scheduler.prompts[0])
    assert prompt.endswith("<tool_response>\n《静夜思》 李白\n床前明月光\n</tool_response><|im_end|>\n"
                           "<|im_start|>assistant\n")


def test_tool_choice_forces_none_a_call_or_a_named_call(tokenizer):
    client, scheduler = scripted_client(tokenizer, [CALL_TEXT, 'search_poems", "arguments": {"query": "春晓"}}\n'
                                                    "</tool_call>", '{"query": "雪"}}\n</tool_call>'])
    assert ask(client, tools=[SEARCH], tool_choice="none").choices[0].message.content == CALL_TEXT
    assert "# 工具" not in tokenizer.decode(scheduler.prompts[0])
    required = ask(client, tools=[SEARCH], tool_choice="required").choices[0].message
    assert tokenizer.decode(scheduler.prompts[1]).endswith('<|im_start|>assistant\n<tool_call>\n{"name": "')
    assert json.loads(required.tool_calls[0].function.arguments) == {"query": "春晓"}
    named = ask(client, tools=[SEARCH], tool_choice={"type": "function", "function": {"name": "search_poems"}})
    assert json.loads(named.choices[0].message.tool_calls[0].function.arguments) == {"query": "雪"}


def test_the_chat_pages_tools_are_offered_and_run(tokenizer):
    import asyncio
    import httpx
    from serve import create_app
    app = create_app(ScriptedScheduler([]), tokenizer, "tiny", 1024, built_in_tools=["search_poems"])

    async def calls():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            offered = (await http.get("/tools")).json()["tools"]
            result = (await http.post("/tools/search_poems", json={"query": "静夜思"})).json()["content"]
            unknown = await http.post("/tools/rm_rf", json={})
            return offered, result, unknown
    offered, result, unknown = asyncio.run(calls())
    assert [t["function"]["name"] for t in offered] == ["search_poems"]
    assert result.startswith("《静夜思》 作者：李白\n床前") and "低头思故乡" in result and unknown.status_code == 404


# --- rollouts with tools (--mode grpo --tools) ------------------------------------------------------------

class ScriptedModel(torch.nn.Module):
    """Transformer.sample's interface, answering each call with the next scripted text of each row."""

    def __init__(self, tokenizer, turns):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"max_seq_len": 1024})
        self.turns = [[tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in row]
                      for row in turns]
        self.prompts = []

    def sample(self, input_ids, max_new_tokens, prompt_lengths=None, **kwargs):
        rows = [self.turns[i].pop(0) for i in range(len(input_ids))]
        self.prompts.append([ids[:n].tolist() for ids, n in zip(input_ids, prompt_lengths)])
        width = max(map(len, rows))
        return torch.tensor([row + [row[-1]] * (width - len(row)) for row in rows])


def test_a_rollout_with_tools_runs_the_call_and_trains_only_the_models_tokens(tokenizer):
    """The model calls search_poems, the result comes back in the template's tool turn, the model answers:
    the labels are the call and the answer (with their <|im_end|>), never the tool turn."""
    from types import SimpleNamespace
    from rollout import sample_with_tools
    model = ScriptedModel(tokenizer, [[CALL_TEXT, "《静夜思》的作者是李白。"]])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "《静夜思》的作者是谁？"}], tools=[SEARCH],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    settings = SimpleNamespace(max_new_tokens=64, temperature=1.0, top_p=1.0, max_tool_calls=2)
    rollouts = sample_with_tools(model, [prompt], 1, settings, tokenizer, [tokenizer.eos_token_id],
                                 torch.autocast("cpu", enabled=False), {"search_poems"})
    assert rollouts.texts == ["《静夜思》的作者是李白。"]
    completion = tokenizer.decode(rollouts.completion_ids[0])
    assert completion.startswith(CALL_TEXT + "<|im_end|>\n<|im_start|>user\n<tool_response>\n《静夜思》 作者：李白")
    assert completion.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n《静夜思》的作者是李白。<|im_end|>")
    rows = rollouts.training_rows(tokenizer.pad_token_id)
    labelled = tokenizer.decode([t for t in rows["labels"][0].tolist() if t != -100])
    assert labelled == CALL_TEXT + "<|im_end|>" + "《静夜思》的作者是李白。<|im_end|>"
    # The second turn was sampled after the whole conversation so far, as the template renders it.
    assert tokenizer.decode(model.prompts[1][0]).endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_eval_counts_the_answers_that_call_and_the_valid_calls(tokenizer):
    from eval import with_tools

    class Scored:  # the part of lm-eval's HFLM that with_tools uses
        def __init__(self):
            self.tokenizer = tokenizer

    lm = with_tools(Scored, ["search_poems"], model_dir=None, max_tool_calls=2)()
    lm.tool_use = {}
    eos = tokenizer.eos_token_id
    for text in [CALL_TEXT, "李白。", '<tool_call>\n{"name": "search", "arguments": {}}\n</tool_call>',
                 '<tool_call>\nnot json\n</tool_call>']:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        later_turn = tokenizer("后来的回答", add_special_tokens=False)["input_ids"]  # not counted
        lm.count_tool_use("poetry_tools_title", ids + [eos] + later_turn, [eos])
    assert lm.tool_use == {"poetry_tools_title": {"answers": 4, "called": 3, "calls": 3, "valid_calls": 1}}


def test_generate_runs_the_call_and_answers_after_its_result(tokenizer, monkeypatch, capsys):
    import generate
    answers = iter([CALL_TEXT, "《静夜思》的作者是李白。"])
    monkeypatch.setattr(generate, "complete", lambda model, tok, prompt, args, stops, streamer=None:
                        tokenizer(next(answers), add_special_tokens=False)["input_ids"])
    runs = []
    monkeypatch.setattr(generate, "run_tool", lambda name, arguments: runs.append((name, arguments)) or "《静夜思》 李白")
    args = generate.parse_args(["--model", "unused", "--chat", "--tools", "search_poems"])
    messages = [{"role": "user", "content": "《静夜思》的作者是谁？"}]
    answer = generate.reply(None, tokenizer, messages, args, [tokenizer.eos_token_id], stream=True)
    assert runs == [("search_poems", {"query": "静夜思"})]  # the arguments as a dict, as the tool takes them
    assert answer == "《静夜思》的作者是李白。"
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"] and messages[2]["content"] == "《静夜思》 李白"
    assert "<tool_response>\n《静夜思》 李白\n</tool_response>" in capsys.readouterr().out
