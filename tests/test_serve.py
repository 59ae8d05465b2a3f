"""serve.py: the official `openai` client against a server started here, and continuous batching.

The server runs as `python serve.py` on 127.0.0.1 with a free port and conftest's tiny chatty model. The
oracles: the `openai` client parses every answer, stream and error; generate.py prints the text a greedy
(or seeded) answer must equal; transformers' LlamaForCausalLM gives the tokens each sequence of a batch
must get, decoded alone.
"""
import contextlib
import io
import json

import httpx
import openai
import pytest
import torch

from benchmarks import serving as serving_bench
from conftest import (QUESTION, SYSTEM, chain_prompts, health, hf_greedy, running_server, tiny_config, when_idle,
                      write_chatty_model)

API_KEY = "test-key"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return write_chatty_model(tmp_path_factory.mktemp("serve") / "tiny-chat", tokenizer, max_seq_len=1024)


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    with running_server(model_dir, tmp_path_factory.mktemp("log") / "serve.log",
                        "--api_key", API_KEY, "--max_batch_size", 4) as process_and_url:
        yield process_and_url


@pytest.fixture
def server(served):
    return served[1]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, timeout=60, max_retries=0)


def generate_py(model_dir, *args):
    """What `python generate.py --model model_dir ARGS` prints (run in this process)."""
    import generate
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        generate.main(["--model", model_dir, "--device", "cpu", *map(str, args)])
    return out.getvalue()


def chat(client, **kwargs):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    return client.chat.completions.create(model="tiny-chat", messages=messages, **kwargs)


# --- answers ---------------------------------------------------------------------------------------------

def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-chat"]
    assert client.models.retrieve("tiny-chat").id == "tiny-chat"
    with pytest.raises(openai.NotFoundError) as error:
        client.models.retrieve("gpt-4")
    assert error.value.code == "model_not_found"


def test_greedy_chat_is_what_generate_py_prints(client, model_dir, tokenizer):
    answer = chat(client, temperature=0, max_tokens=40)
    printed = generate_py(model_dir, "--chat", "--system", SYSTEM, "--prompt", QUESTION, "--temperature", 0,
                          "--max_new_tokens", 40)
    text = answer.choices[0].message.content
    assert len(set(text)) > 5, "a degenerate answer: the comparison would be weak"
    assert text + "\n" == printed
    assert answer.choices[0].finish_reason == "length"
    assert answer.choices[0].message.role == "assistant"
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM},
                                            {"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                           return_dict=True)["input_ids"]
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), 40)
    assert answer.usage.total_tokens == len(prompt) + 40


def test_streaming_gives_the_same_answer_in_chunks(client, server):
    whole = chat(client, temperature=0, max_tokens=30).choices[0].message.content
    chunks = list(chat(client, temperature=0, max_tokens=30, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 5 and "".join(pieces) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    # The raw stream: server-sent events, the last one `data: [DONE]`.
    with httpx.stream("POST", f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 5,
                            "stream": True}, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_completions_is_what_generate_py_prints(client, model_dir):
    prompt = "春眠不觉晓"
    answer = client.completions.create(model="tiny-chat", prompt=prompt, temperature=0, max_tokens=25)
    printed = generate_py(model_dir, "--prompt", prompt, "--temperature", 0, "--max_new_tokens", 25)
    assert answer.choices[0].text + "\n" == printed
    streamed = client.completions.create(model="tiny-chat", prompt=prompt, temperature=0, max_tokens=25,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == answer.choices[0].text
    default = client.completions.create(model="tiny-chat", prompt=prompt, temperature=0)
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


def test_stop_strings_end_the_answer_before_them(client):
    free = chat(client, temperature=0, max_tokens=40).choices[0].message.content
    stop = free[12:14]
    expected = free[:free.index(stop)]
    answer = chat(client, temperature=0, max_tokens=40, stop=[stop, "never appears 不会"])
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "stop"
    streamed = chat(client, temperature=0, max_tokens=40, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_a_seed_makes_sampling_repeatable(client):
    settings = dict(temperature=1.0, top_p=0.9, max_tokens=30, extra_body={"top_k": 20})
    answers = [chat(client, seed=seed, **settings).choices[0].message.content for seed in (7, 7, 8)]
    assert answers[1] == answers[0] and answers[2] != answers[0]
    assert answers[0] != chat(client, temperature=0, max_tokens=30).choices[0].message.content


def test_concurrent_streams_each_get_their_own_answer(client):
    """Four streams at once (one batch) with prompts of different lengths: each gets the answer it gets alone."""
    from concurrent.futures import ThreadPoolExecutor
    questions = ["你好", QUESTION, "《春晓》的作者是谁？请写出全诗。", "床前明月光的下一句"]

    def ask(question, stream):
        kwargs = dict(model="tiny-chat", messages=[{"role": "user", "content": question}], temperature=0,
                      max_tokens=60)
        if not stream:
            return client.chat.completions.create(**kwargs).choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs))

    alone = [ask(q, stream=False) for q in questions]
    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(ask, questions, [True] * len(questions)))
    assert together == alone


# --- errors ----------------------------------------------------------------------------------------------

TOO_LONG = "明月" * 1100  # more tokens than the 1,024 of context

BAD_REQUESTS = {  # request body -> (param named in the error, code)
    "missing messages": ({"model": "m"}, "messages", None),
    "messages not a list": ({"messages": "hello"}, "messages", None),
    "no messages": ({"messages": []}, "messages", None),
    "message without content": ({"messages": [{"role": "user"}]}, "messages.0.content", None),
    "message not an object": ({"messages": ["hello"]}, "messages.0", None),
    "unknown role": ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role", None),
    "content neither text nor text parts": ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                                            "messages.0.content", None),
    "negative max_tokens": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, "max_tokens", None),
    "zero max_tokens": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens", None),
    "oversized max_tokens": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000},
                             "max_tokens", "context_length_exceeded"),
    "prompt longer than the context": ({"messages": [{"role": "user", "content": TOO_LONG}]}, "messages",
                                       "context_length_exceeded"),
    "temperature out of range": ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3},
                                 "temperature", None),
    "five stop strings": ({"messages": [{"role": "user", "content": "hi"}], "stop": list("abcde")}, "stop", None),
    "two choices": ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n", None),
    "seed too large for a generator": ({"messages": [{"role": "user", "content": "hi"}], "seed": 2**70}, "seed", None),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_chat_requests_get_an_openai_error(client, name):
    body, param, code = BAD_REQUESTS[name]
    with pytest.raises(openai.BadRequestError) as error:
        client.post("/chat/completions", body=body, cast_to=object)
    assert error.value.status_code == 400
    assert error.value.param == param and error.value.code == code
    assert error.value.type == "invalid_request_error" and error.value.message


def test_bad_completion_requests_get_an_openai_error(client):
    for body, param, code in [({"prompt": TOO_LONG}, "prompt", "context_length_exceeded"),
                              ({"prompt": "hi", "max_tokens": -5}, "max_tokens", None),
                              ({"prompt": [1, 99999]}, "prompt", None),
                              ({"max_tokens": 5}, "prompt", None)]:
        with pytest.raises(openai.BadRequestError) as error:
            client.post("/completions", body=body, cast_to=object)
        assert (error.value.param, error.value.code) == (param, code), body


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", "\u00ff".encode("latin-1")])
def test_a_body_that_is_not_a_json_object_gets_400(server, body):
    response = httpx.post(f"{server}/v1/chat/completions", content=body, timeout=30,
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


@pytest.mark.parametrize("key", ["wrong-key", None])
def test_a_wrong_or_missing_key_gets_401(server, key):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=key or "unused", max_retries=0, timeout=30)
    headers = {} if key else {"Authorization": ""}
    with pytest.raises(openai.AuthenticationError) as error:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                       extra_headers=headers)
    assert error.value.status_code == 401 and error.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.models.list(extra_headers=headers)


def test_a_client_that_leaves_mid_stream_frees_its_row(server, client):
    before = health(server)["finished"]
    with httpx.stream("POST", f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 900,
                            "temperature": 0, "stream": True}, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    after = when_idle(server)
    assert after["running"] == 0
    assert after["finished"]["cancelled"] == before["cancelled"] + 1
    assert after["finished"]["length"] == before["length"]  # it did not simply run to its end
    assert chat(client, temperature=0, max_tokens=3).choices[0].finish_reason == "length"  # still serving


# --- continuous batching, in this process ----------------------------------------------------------------

def test_batched_decoding_equals_decoding_alone(tokenizer, chain_model):
    """Sequences with prompts of different lengths join a running batch at different steps, more than
    fit (one waits for a free row), one ends at an end token and the others at their max_tokens, so rows
    are freed and moved mid-batch: each gets the greedy tokens of HF's LlamaForCausalLM decoding it alone."""
    import asyncio
    from scheduler import Scheduler, Sequence
    model, _, hf = chain_model
    vocab = model.config.vocab_size
    # (prompt, max_tokens, the step at which it arrives)
    plan = [(chain_prompts(vocab, [0], 6), 20, 0), (chain_prompts(vocab, [9], 11), 8, 3),
            (chain_prompts(vocab, [20], 4), 25, 3), (chain_prompts(vocab, [5], 9), 12, 5),
            (torch.randint(vocab, (1, 7), generator=torch.Generator().manual_seed(3)), 15, 6)]
    expected = [hf_greedy(hf, prompt, n)[0, prompt.shape[1]:].tolist() for prompt, n, _ in plan]
    eos = expected[2][9]  # the third sequence ends there: its row is freed while others run on
    assert eos not in expected[2][:9]
    for i in (0, 1, 3, 4):  # the others end at max_tokens; cut them where eos would stop them
        if eos in expected[i]:
            expected[i] = expected[i][:expected[i].index(eos)]
    expected[2] = expected[2][:9]

    loop = asyncio.new_event_loop()
    scheduler = Scheduler(model, tokenizer, stop_ids=[eos], max_batch_size=3)
    sequences = [Sequence(prompt[0].tolist(), n, 0.0, None, None, [], None, loop) for prompt, n, _ in plan]
    busiest = 0
    with torch.no_grad():
        for step in range(60):
            for sequence, (_, _, arrives) in zip(sequences, plan):
                if arrives == step:
                    scheduler.submit(sequence)
            scheduler.iterate()
            busiest = max(busiest, len(scheduler.rows))
    loop.run_until_complete(asyncio.sleep(0))  # deliver the events posted to the loop
    loop.close()
    assert busiest == 3 and not scheduler.rows and scheduler.waiting.empty()
    for i, sequence in enumerate(sequences):
        assert sequence.output.streamer.ids == expected[i], f"sequence {i}"
        events = []
        while not sequence.events.empty():
            events.append(sequence.events.get_nowait())
        assert events[-1][0] == "end" and events[-1][2]["completion_tokens"] == sequence.generated
    ended_at_eos = sum(len(e) < n for e, (_, n, _) in zip(expected, plan))
    assert scheduler.finished == {"stop": ended_at_eos, "length": len(plan) - ended_at_eos, "cancelled": 0,
                                  "error": 0}


def test_ignore_eos_runs_through_the_end_token_to_max_tokens(tokenizer, chain_model):
    """ignore_eos (vLLM's extra field, for fixed-length benchmarks): the answer goes on through the token
    that ends the same request without it, to max_tokens, with the tokens greedy decoding gives."""
    import asyncio
    from scheduler import Scheduler, Sequence
    model, _, _ = chain_model
    prompt = [5, 6, 7, 8]
    greedy = model.generate(torch.tensor([prompt]), 12, temperature=0)[0, len(prompt):].tolist()
    eos = greedy[3]
    assert eos not in greedy[:3]
    loop = asyncio.new_event_loop()
    scheduler = Scheduler(model, tokenizer, stop_ids=[eos], max_batch_size=2)
    stopping, ignoring = (Sequence(prompt, 12, 0.0, None, None, [], None, loop, ignore_eos=flag)
                          for flag in (False, True))
    with torch.no_grad():
        scheduler.submit(stopping)
        scheduler.submit(ignoring)
        for _ in range(14):
            scheduler.iterate()
    loop.close()
    assert stopping.output.streamer.ids == greedy[:3] and stopping.generated == 4
    assert ignoring.output.streamer.ids == greedy and ignoring.generated == 12
    assert scheduler.finished == {"stop": 1, "length": 1, "cancelled": 0, "error": 0}


@pytest.mark.slow
def test_bench_load_every_valid_request_answered_every_malformed_one_refused(served):
    """bench.py --serve's mixed load, small: valid requests answered in full, malformed ones a 4xx JSON
    error; the server ends idle (its speed figures are measured here, not asserted)."""
    process, url = served
    results = serving_bench.measure_serving(url, process.pid, quick=True, requests=40, api_key=API_KEY)
    mixed = results["mixed"]
    assert (mixed["good"]["sent"], mixed["bad"]["sent"], mixed["leave"]["sent"]) == (36, 2, 2)
    assert mixed["good"]["as_expected"] == 36 and mixed["bad"]["as_expected"] == 2
    idle = when_idle(url)
    assert idle["running"] == idle["waiting"] == 0


def test_a_failing_request_gets_an_error_and_the_others_run_on(tokenizer):
    """A prompt the model fails on (an id past the vocabulary, which the HTTP layer would refuse) ends
    that request with an error event; the running sequence is not disturbed and finishes."""
    import asyncio
    from model import Transformer
    from scheduler import Scheduler, Sequence
    torch.manual_seed(0)
    model = Transformer(tiny_config(len(tokenizer))).eval()
    loop = asyncio.new_event_loop()
    scheduler = Scheduler(model, tokenizer, stop_ids=[], max_batch_size=4)
    running = Sequence([5, 6, 7], 10, 0.0, None, None, [], None, loop)
    failing = Sequence([5, len(tokenizer) + 10], 10, 0.0, None, None, [], None, loop)
    with torch.no_grad():
        scheduler.submit(running)
        scheduler.iterate()
        scheduler.submit(failing)
        for _ in range(12):
            scheduler.iterate()
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    events = {name: [s.events.get_nowait() for _ in range(s.events.qsize())]
              for name, s in [("running", running), ("failing", failing)]}
    assert [e[0] for e in events["failing"]] == ["error"]
    assert events["running"][-1][:2] == ("end", "length") and running.generated == 10
    assert scheduler.finished["error"] == 1 and not scheduler.rows


def test_the_scheduler_thread_decodes_in_the_dtype_asked_for(chain_model, tokenizer):
    """serve.py --dtype bfloat16: the scheduler's own thread decodes under bf16 autocast (autocast is per
    thread), giving the greedy tokens of the model converted to bf16."""
    import asyncio
    import threading
    from model import Transformer
    from scheduler import Scheduler, Sequence
    model = chain_model[0]
    converted = Transformer(model.config).eval()
    converted.load_state_dict(model.state_dict())
    converted.to(torch.bfloat16)

    def greedy(m, prompt):
        return m.generate(torch.tensor([prompt]), 24, temperature=0)[0, len(prompt):].tolist()
    # A prompt whose greedy answer bf16 changes, so that the test tells the dtypes apart.
    prompt = next(p for p in ([i, i + 1, i + 2] for i in range(0, 3000, 7)) if greedy(converted, p) != greedy(model, p))
    expected = greedy(converted, prompt)
    loop = asyncio.new_event_loop()
    scheduler = Scheduler(model, tokenizer, stop_ids=[], max_batch_size=2, dtype=torch.bfloat16)
    threading.Thread(target=scheduler.run, daemon=True).start()
    sequence = Sequence(prompt, 24, 0.0, None, None, [], None, loop)
    scheduler.submit(sequence)
    events = []
    while not events or events[-1][0] == "text":
        events.append(loop.run_until_complete(asyncio.wait_for(sequence.events.get(), 60)))
    loop.close()
    assert events[-1][0] == "end" and sequence.output.streamer.ids == expected
