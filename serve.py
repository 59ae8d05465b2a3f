"""Serve a model over an OpenAI-compatible HTTP API, with continuous batching and a web chat page.

    python serve.py --model runs/demo/sft                  then open http://127.0.0.1:8000/
    python serve.py --model sft_model --api_key KEY --max_batch_size 16 --compile

Endpoints (the subset of OpenAI's API that the official `openai` client needs for text):
    GET  /v1/models             the one model served, named after its directory
    POST /v1/chat/completions   messages -> the assistant's answer (stream: server-sent events)
    POST /v1/completions        prompt -> its continuation
    GET  /                      the chat page (static/chat.html)
    GET  /health                200 while the server runs, with the scheduler's counters
    GET  /tools, POST /tools/N  the built-in tools of --tools, for the chat page

How it works. One scheduler thread owns the model and decodes every running request together, one token
each per step (scheduler.py: continuous batching); the HTTP handlers (FastAPI on uvicorn, asyncio)
validate and tokenize a request, put it on the scheduler's queue and read its text back from an asyncio
queue. With tools (OpenAI's protocol: tools, tool_choice, tool_calls) the model's calls come back to the
client, which runs them; --tools names built-in tools the server runs for the chat page (tools.py).
"""
import argparse
import asyncio
import json
import os
import re
import secrets
import sys
import threading
import time
import traceback
import uuid
from typing import Literal

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator
from starlette.exceptions import HTTPException

from generate import load, stop_ids
from hardware import add_dtype_argument, choose_dtype, warn_if_emulated
from scheduler import Scheduler, Sequence
from tools import BUILT_IN, parse_tool_calls, run_tool, tool_schemas

CHAT_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "chat.html")
MAX_STOP_STRINGS = 4  # as OpenAI

# A request's way through this file: chat_prompt_ids or completion_prompt_ids (the request -> prompt ids),
# answer_max_tokens and sequence_for (-> the scheduler's Sequence), scheduler.Scheduler (tokens -> text
# events, each answer's text cut at its stop strings by TextOutput), respond (events -> one JSON object, whole_response,
# or server-sent events, event_stream), with ChatAnswer or CompletionAnswer putting the generated text into
# the endpoint's shapes. Errors of every kind are APIErrors, answered as OpenAI does.


# --- the HTTP API: requests and errors ---------------------------------------------------------

class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, code=None, type="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self):
        return JSONResponse(self.body(), status_code=self.status)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON, as OpenAI sends it


class ToolCall(BaseModel):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # the call a tool message answers
    # Declared last: pydantic validates fields in order, and content's validator reads role and tool_calls.
    content: str | list[TextPart] | None = Field(default=None, validate_default=True)

    @field_validator("content")
    @classmethod
    def content_unless_calls(cls, content, info):
        if content is None and not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
            raise ValueError("a message needs content (an assistant's may have tool_calls instead)")
        return content

    def text(self):
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def for_template(self):
        """The message as the chat template reads it (the calls' arguments parsed: they must be JSON)."""
        message = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            calls = []
            for call in self.tool_calls:
                try:
                    arguments = json.loads(call.function.arguments)
                except json.JSONDecodeError:
                    raise APIError(400, f"The arguments of the call to {call.function.name} are not JSON.",
                                   "messages")
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments}})
            message["tool_calls"] = calls
        return message


class FunctionSpec(BaseModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionCall | dict


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields both endpoints share; others that OpenAI knows (penalties, logprobs...) are ignored."""
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # 0: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's; vLLM's and llama.cpp's extra field. 0: off
    ignore_eos: bool = False  # vLLM's extra field: answers run to max_tokens (fixed-length benchmarks)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, lt=2**64)  # what torch.Generator takes
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1)  # one choice per request

    def stop_strings(self):
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
            raise APIError(400, f"'stop' takes up to {MAX_STOP_STRINGS} non-empty strings", "stop")
        return stop


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None

    def offered_tools(self):
        """The schemas the model sees ([] with tool_choice "none"), and the name a named tool_choice forces."""
        if not self.tools or self.tool_choice == "none":
            return [], None
        schemas = [tool.model_dump(exclude_none=True) for tool in self.tools]
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function["name"] if isinstance(self.tool_choice.function, dict) \
                else self.tool_choice.function.name
            if name not in {tool.function.name for tool in self.tools}:
                raise APIError(400, f"tool_choice names {name!r}, which is not among 'tools'.", "tool_choice")
            return schemas, name
        return schemas, None


class CompletionRequest(SamplingRequest):
    prompt: str | list[int]


def validation_error(exc):
    """A FastAPI/pydantic validation error as an OpenAI error: the first problem, named by its field."""
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request: it is not valid JSON.")
    if tuple(first["loc"]) == ("body",):
        return APIError(400, f"The body of your request must be a JSON object ({first['msg']}).")
    # loc: ("body", field, index, ...), and for a union the member tried last ("str", "list[int]"): dropped.
    where = [str(part) for part in first["loc"][1:]
             if not re.fullmatch(r"str|int|float|bool|(list|dict)\[.*\]", str(part))]
    param = ".".join(where) or None
    return APIError(400, f"Invalid '{param}': {first['msg']}" if param else first["msg"], param)


def add_error_handlers(app):
    """Every error, the app's own, a request FastAPI refuses or a bug, answered in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def api_error(request, exc):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc):
        return validation_error(exc).response()

    @app.exception_handler(Exception)
    async def server_error(request, exc):  # a bug: still an answer in OpenAI's shape (the log has the traceback)
        traceback.print_exception(exc)
        return APIError(500, "the server failed on this request; see its log", type="server_error").response()

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return APIError(exc.status_code, str(exc.detail)).response()


def key_check(api_key):
    """The dependency that refuses a request without 'Authorization: Bearer api_key' (none: all pass)."""

    def check_key(request: Request):
        if api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided." if given else
                           "You didn't provide an API key: send it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")
    return check_key


# --- a request -> prompt ids and the scheduler's Sequence --------------------------------------

def chat_prompt_ids(tokenizer, body):
    """(prompt ids, forced start of the answer): the conversation in the model's chat template, with the
    request's tools, ending where the assistant's answer starts. tool_choice "required" or a named tool
    makes the answer start as a call (to that tool): the template's call opening is appended to the prompt
    and is the start of the answer, which ChatAnswer reads back."""
    schemas, named = body.offered_tools()
    if schemas and "tools" not in (tokenizer.chat_template or ""):
        raise APIError(400, "This model's chat template renders no tools (a tokenizer written before tool "
                            "calling).", "tools")
    messages = [m.for_template() for m in body.messages]
    prompt = tokenizer.apply_chat_template(messages, tools=schemas or None, add_generation_prompt=True,
                                           tokenize=False)
    forced = ""
    if named is not None:
        forced = f'<tool_call>\n{{"name": "{named}", "arguments": '
    elif body.tool_choice == "required":
        forced = '<tool_call>\n{"name": "'
    return tokenizer(prompt + forced, add_special_tokens=False)["input_ids"], forced


def completion_prompt_ids(tokenizer, body):
    """The prompt's token ids: its text tokenized as it is (no special tokens added), or the ids given."""
    if isinstance(body.prompt, str):
        prompt_ids = tokenizer(body.prompt, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = body.prompt
        if any(not 0 <= t < len(tokenizer) for t in prompt_ids):
            raise APIError(400, f"'prompt': token ids must be in [0, {len(tokenizer)})", "prompt")
    if not prompt_ids:
        raise APIError(400, "'prompt' is empty", "prompt")
    return prompt_ids


def answer_max_tokens(body, prompt_length, max_seq_len, default, prompt_param):
    """How many tokens the answer may have: the request's max_tokens, else `default` or what room the
    context leaves. A prompt and answer longer than the context: error 400, naming prompt_param or
    max_tokens."""
    room = max_seq_len - prompt_length
    too_long = f"This model's maximum context length is {max_seq_len} tokens, and the prompt has {prompt_length}"
    if room < 1:
        raise APIError(400, f"{too_long}: no room is left for an answer. Please shorten the prompt.",
                       prompt_param, "context_length_exceeded")
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or min(default, room)
    if max_tokens > room:
        raise APIError(400, f"{too_long}: at most {room} tokens are left for the answer, not {max_tokens}. "
                            f"Please reduce max_tokens or the prompt.", "max_tokens", "context_length_exceeded")
    return max_tokens


def sequence_for(body, prompt_ids, max_tokens, device):
    """The scheduler's Sequence for a request, its events read in the running event loop."""
    generator = None
    if body.seed is not None:
        generator = torch.Generator(device).manual_seed(body.seed)
    temperature = 1.0 if body.temperature is None else body.temperature  # OpenAI's default
    return Sequence(prompt_ids, max_tokens, temperature, body.top_k or None, body.top_p, body.stop_strings(),
                    generator, asyncio.get_running_loop(), ignore_eos=body.ignore_eos)


# --- the generated text -> the response --------------------------------------------------------

def choice(fields, finish_reason):
    return {"index": 0, **fields, "finish_reason": finish_reason, "logprobs": None}


class ChatAnswer:
    """The generated text as chat.completion's choices: the assistant's message (whole), or the deltas
    that make it up (stream: opening, piece and closing give the choices to send, a chunk each).

    With tools, the text may hold calls (<tool_call>{json}</tool_call>): the message then has tool_calls
    (ids, name, arguments as a JSON string) and the finish reason is "tool_calls". Streamed, the text from
    a possible call's first "<" on is held back until the answer ends, then sent as tool-call deltas. A call
    the model writes badly (not JSON, a tool not offered) comes back as plain content."""
    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, tool_names=(), forced=""):
        self.tool_names, self.held, self.sent = set(tool_names), forced, False

    def whole(self, text, finish_reason):
        content, calls = self.calls_of(self.held + text)
        message = {"role": "assistant", "content": content if not calls else (content or None)}
        if calls:
            message["tool_calls"] = calls
        return choice({"message": message}, "tool_calls" if calls else finish_reason)

    def opening(self):  # the role, before any text
        return [choice({"delta": {"role": "assistant", "content": ""}}, None)]

    def piece(self, text):
        if not self.tool_names:
            return [choice({"delta": {"content": text}}, None)]
        text, self.held = hold_back(self.held + text)
        return [choice({"delta": {"content": text}}, None)] if text else []

    def closing(self, finish_reason):
        content, calls = self.calls_of(self.held)
        pieces = [choice({"delta": {"content": content}}, None)] if content else []
        for index, call in enumerate(calls):
            pieces.append(choice({"delta": {"tool_calls": [{"index": index, **call}]}}, None))
        return pieces + [choice({"delta": {}}, "tool_calls" if calls else finish_reason)]

    def calls_of(self, text):
        """(content, OpenAI tool_calls) of a text; a malformed call keeps the whole text as content."""
        if not self.tool_names:
            return text, []
        content, calls, malformed = parse_tool_calls(text, self.tool_names)
        if malformed or not calls:
            return text, []
        return content, [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                         for c in calls]


def hold_back(text, opening="<tool_call>"):
    """(what may be sent now, what is held): the text up to a call's opening, or up to an end that could
    be the start of one."""
    start = text.find(opening)
    if start < 0:
        start = next((i for i in range(max(0, len(text) - len(opening) + 1), len(text))
                      if opening.startswith(text[i:])), len(text))
    return text[:start], text[start:]


class CompletionAnswer:
    """The generated text as text_completion's choices, whole or (stream) piece by piece."""
    object = chunk_object = "text_completion"
    id_prefix = "cmpl"

    def whole(self, text, finish_reason):
        return choice({"text": text}, finish_reason)

    def opening(self):
        return []

    def piece(self, text):
        return [choice({"text": text}, None)]

    def closing(self, finish_reason):
        return [choice({"text": ""}, finish_reason)]


async def sequence_events(scheduler, sequence):
    """The sequence's events until its end; if the client goes away first, its row is freed."""
    scheduler.submit(sequence)
    try:
        while True:
            event = await sequence.events.get()
            yield event
            if event[0] != "text":
                return
    finally:
        sequence.cancelled = True  # read by the scheduler; a no-op once the sequence has ended


async def respond(scheduler, sequence, body, answer, model_name):
    """The whole answer as one JSON object, or (stream) server-sent events, in OpenAI's formats."""
    head = {"id": f"{answer.id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
    events = sequence_events(scheduler, sequence)
    if not body.stream:
        return await whole_response(events, answer, head)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return StreamingResponse(event_stream(events, answer, head, include_usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def whole_response(events, answer, head):
    """The JSON object of a non-streamed answer, once it has ended; its failure: error 500."""
    parts = []
    async for event in events:
        if event[0] == "text":
            parts.append(event[1])
        elif event[0] == "error":
            raise APIError(500, event[1], type="server_error")
        else:
            return {**head, "object": answer.object, "choices": [answer.whole("".join(parts), event[1])],
                    "usage": event[2]}


def sse(payload):
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def event_stream(events, answer, head, include_usage):
    """A streamed answer's server-sent events: a chunk per piece of text, the finish reason, the usage if
    asked, then [DONE]. A failure mid-stream is an error event (the status, 200, is sent already)."""

    def chunk(choices, **extra):
        return sse({**head, "object": answer.chunk_object, "choices": choices, **extra})

    for opening in answer.opening():
        yield chunk([opening])
    async for event in events:
        if event[0] == "text":
            for piece in answer.piece(event[1]):
                yield chunk([piece])
        elif event[0] == "error":
            yield sse(APIError(500, event[1], type="server_error").body())
        else:
            for closing in answer.closing(event[1]):
                yield chunk([closing])
            if include_usage:
                yield chunk([], usage=event[2])
    yield "data: [DONE]\n\n"


# --- the app -----------------------------------------------------------------------------------

def create_app(scheduler, tokenizer, model_name, max_seq_len, api_key=None, built_in_tools=()):
    """The FastAPI app. `tokenizer` encodes prompts in the event loop: it must not be the scheduler's,
    which decodes at the same time in its own thread (a Rust tokenizer object is not to be shared).
    built_in_tools: the names of tools.py's tools that /tools offers and runs (the chat page's)."""
    app = FastAPI(title="Tiny-LLM", docs_url=None, redoc_url=None)
    add_error_handlers(app)
    with_key = [Depends(key_check(api_key))]
    model_card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "tiny-llm",
                  "max_model_len": max_seq_len}

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(CHAT_PAGE, media_type="text/html")

    @app.get("/health")
    async def health():
        return {"status": "ok", **scheduler.stats()}

    @app.get("/v1/models", dependencies=with_key)
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{name:path}", dependencies=with_key)
    async def model(name: str):
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server has '{model_name}'.", "model",
                           "model_not_found")
        return model_card

    @app.post("/v1/chat/completions", dependencies=with_key)
    async def chat_completions(body: ChatRequest):
        prompt_ids, forced = chat_prompt_ids(tokenizer, body)
        # Without max_tokens, an answer may fill the rest of the context (OpenAI's default).
        max_tokens = answer_max_tokens(body, len(prompt_ids), max_seq_len, max_seq_len, "messages")
        sequence = sequence_for(body, prompt_ids, max_tokens, scheduler.device)
        names = [tool["function"]["name"] for tool in body.offered_tools()[0]]
        return await respond(scheduler, sequence, body, ChatAnswer(names, forced), model_name)

    @app.get("/tools")
    async def tools():
        """The built-in tools this server runs (--tools), for the chat page to offer its model."""
        return {"tools": tool_schemas(built_in_tools)}

    @app.post("/tools/{name}")
    async def run(name: str, request: Request):
        """Run a built-in tool of --tools on the JSON arguments of the body: {"content": result}."""
        if name not in built_in_tools:
            raise APIError(404, f"This server runs no tool {name!r}.", "name")
        try:
            arguments = await request.json()
        except json.JSONDecodeError:
            raise APIError(400, "The arguments are not JSON.")
        if not isinstance(arguments, dict):
            raise APIError(400, "The arguments must be a JSON object.")
        return {"content": await asyncio.to_thread(run_tool, name, arguments)}

    @app.post("/v1/completions", dependencies=with_key)
    async def completions(body: CompletionRequest):
        prompt_ids = completion_prompt_ids(tokenizer, body)
        max_tokens = answer_max_tokens(body, len(prompt_ids), max_seq_len, 16, "prompt")  # OpenAI's 16
        sequence = sequence_for(body, prompt_ids, max_tokens, scheduler.device)
        return await respond(scheduler, sequence, body, CompletionAnswer(), model_name)

    return app


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory written by train_model.py")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--api_key", default=None, help="clients must send 'Authorization: Bearer KEY'")
    p.add_argument("--max_batch_size", type=int, default=8, help="sequences decoded together at most")
    add_dtype_argument(p, "decode")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoding step (compiled at start-up, before the first request)")
    p.add_argument("--tools", default="", metavar="NAMES",
                   help=f"built-in tools the chat page offers the model and /tools runs ({', '.join(BUILT_IN)})")
    return p.parse_args(argv)


def main(argv=None):
    import uvicorn
    from transformers import AutoTokenizer
    args = parse_args(argv)
    if args.max_batch_size < 1:
        sys.exit(f"error: --max_batch_size must be at least 1, not {args.max_batch_size}")
    built_in_tools = [name for name in args.tools.split(",") if name]
    unknown = [name for name in built_in_tools if name not in BUILT_IN]
    if unknown:
        sys.exit(f"error: --tools: no built-in tool {', '.join(unknown)}; there is {', '.join(BUILT_IN)}")
    model, scheduler_tokenizer = load(args.model, args.device)
    dtype, _ = choose_dtype(next(model.parameters()).device, args.dtype, job="decode")
    warn_if_emulated(next(model.parameters()).device, dtype)
    scheduler = Scheduler(model, scheduler_tokenizer, stop_ids(args.model, scheduler_tokenizer),
                          args.max_batch_size, compile=args.compile, dtype=dtype)
    threading.Thread(target=scheduler.run, name="scheduler", daemon=True).start()
    model_name = os.path.basename(os.path.normpath(args.model))
    app = create_app(scheduler, AutoTokenizer.from_pretrained(args.model), model_name, model.config.max_seq_len,
                     args.api_key, built_in_tools)
    print(f"serving {model_name} ({model.num_params() / 1e6:.2f}M parameters, {model.config.max_seq_len} "
          f"tokens of context) on http://{args.host}:{args.port}/ ; OpenAI API at "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
