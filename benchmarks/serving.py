"""The serving benchmark (python bench.py --serve MODEL_DIR): serve.py under load, measured from outside.

serve.py runs in a process of its own on 127.0.0.1, with one torch thread on CPU unless --threads says
otherwise; the clients are threads of the bench's process. Three figures:
  - time to first token on the idle server (a short chat prompt, streaming): the median of 20;
  - aggregate generated tokens/s of 8 streaming clients against 1, on two workloads: answers of a fixed
    max_tokens (ignore_eos, as vLLM's serving benchmark fixes output lengths), which shows what batching
    the decoding steps buys, and the model's own answers, which end where it says, so that each request's
    prompt pass and HTTP work weigh as much as its decoding;
  - a mixed load of valid, malformed and abandoned requests: every answer checked, and the server's
    resident memory sampled as it goes (a leak shows as a climb).
The trade-offs: the clients share the machine with the server, so on a small CPU they take some of its
time (as real clients on the same host would); throughput is the best of alternating rounds of 1 and 8
clients, as the races time (common.py), while time to first token, one request at a time, is a median.
"""
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import torch

from benchmarks.common import free_port, machine, machine_summary, repo_path, stderr_log

SERVE_QUESTIONS = ["请背诵《静夜思》", "《春晓》的作者是谁？", "写一首关于秋天的诗", "“床前明月光”出自哪首诗？",
                   "请背诵杜甫的《春望》", "《登鹳雀楼》是谁写的？", "你好", "“海内存知己”的下一句是什么？"]
BAD_BODIES = [b"{not json", b'{"messages": "hello"}', b'{"messages": [{"role": "wizard", "content": "hi"}]}',
              b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}', b'{"messages": []}']


@contextlib.contextmanager
def running_server(model_dir, log_path, *args, env=None, ready_timeout_s=120):
    """`python serve.py --model model_dir ARGS` on a free port of 127.0.0.1; yields (process, base URL) once
    /health answers. Its output goes to log_path."""
    port = free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, repo_path("serve.py"),
                                    "--model", model_dir, "--host", "127.0.0.1", "--port", str(port),
                                    *map(str, args)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                with open(log_path) as f:
                    raise RuntimeError(f"serve.py did not start:\n{f.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield process, url
    finally:
        process.terminate()
        process.wait(timeout=30)


def stream_chat(client, url, question, max_tokens, leave_after=None, ignore_eos=False):
    """One streaming chat request: (seconds to the first text, completion tokens, finish reason, complete).
    leave_after: close the connection after that many events, as a client that goes away. ignore_eos: the
    answer runs to max_tokens (vLLM's extra field, as its serving benchmark uses for fixed lengths)."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0.7,
            "stream": True, "stream_options": {"include_usage": True}, **({"ignore_eos": True} if ignore_eos else {})}
    start, first, tokens, finish, done = time.perf_counter(), None, 0, None, False
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for count, line in enumerate(line for line in response.iter_lines() if line):
            if leave_after is not None and count == leave_after:
                return first, tokens, "left", False
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content") and first is None:
                    first = time.perf_counter() - start
                finish = choice["finish_reason"] or finish
    return first, tokens, finish, done and finish in ("stop", "length")


def clients_throughput(url, clients, seconds, max_tokens, headers, ignore_eos):
    """(aggregate generated tokens/s, tokens per answer) of `clients` streaming clients that each ask
    question after question for `seconds` (then finish the one they are on: every client has the same tail)."""
    start = time.perf_counter()

    def client_run(index):
        answers = []
        with httpx.Client(timeout=300, headers=headers) as client:
            for i in itertools.count(index):
                if time.perf_counter() - start > seconds:
                    return answers
                answers.append(stream_chat(client, url, SERVE_QUESTIONS[i % len(SERVE_QUESTIONS)], max_tokens,
                                           ignore_eos=ignore_eos)[1])

    with ThreadPoolExecutor(clients) as pool:
        answers = [tokens for answers in pool.map(client_run, range(clients)) for tokens in answers]
    return sum(answers) / (time.perf_counter() - start), sum(answers) / len(answers)


def mixed_load(url, pid, requests, clients, max_tokens, headers, log):
    """`requests` requests from `clients` threads; one in ten is malformed or (as often) leaves mid-stream.
    Checks every answer; samples the server's resident memory every tenth of the way."""
    kinds = ["good" if i % 10 else ("bad", "leave")[i // 10 % 2] for i in range(requests)]
    server = psutil.Process(pid)
    memory, outcomes = [server.memory_info().rss], []

    def one(i):
        with httpx.Client(timeout=300, headers=headers) as client:
            question = SERVE_QUESTIONS[i % len(SERVE_QUESTIONS)]
            if kinds[i] == "bad":
                response = client.post(f"{url}/v1/chat/completions", content=BAD_BODIES[i % len(BAD_BODIES)],
                                       headers={"Content-Type": "application/json"})
                error = response.json().get("error", {})
                return "bad", 400 <= response.status_code < 500 and bool(error.get("message"))
            if kinds[i] == "leave":
                stream_chat(client, url, question, max_tokens, leave_after=3)
                return "leave", True
            _, tokens, finish, complete = stream_chat(client, url, question, max_tokens)
            return "good", complete and (finish == "stop" or tokens == max_tokens)

    with ThreadPoolExecutor(clients) as pool:
        for i, outcome in enumerate(pool.map(one, range(requests)), 1):
            outcomes.append(outcome)
            if i % (requests // 10 or 1) == 0:
                memory.append(server.memory_info().rss)
                log(f"  {i}/{requests} requests, server RSS {memory[-1] / 1e6:.0f} MB")
    return {kind: {"sent": sum(k == kind for k, _ in outcomes), "as_expected": sum(k == kind and ok for k, ok in outcomes)}
            for kind in ("good", "bad", "leave")} | {"rss_mb": [m / 1e6 for m in memory]}


def measure_serving(url, pid, quick=False, requests=1000, api_key=None, log=lambda message: None):
    """The figures of a running serve.py (process pid at url): time to first token on the idle server,
    aggregate tokens/s of 8 streaming clients against 1, and a mixed load of valid, malformed and
    abandoned requests. The clients are threads of this process."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results = {}
    with httpx.Client(timeout=120, headers=headers) as client:
        stream_chat(client, url, "你好", 8)  # warm-up
        ttft = sorted(stream_chat(client, url, "你好", 4)[0] for _ in range(3 if quick else 20))
    results["ttft_ms"] = {"median": 1000 * ttft[len(ttft) // 2], "best": 1000 * ttft[0]}
    log(f"time to first token, idle: median {results['ttft_ms']['median']:.1f} ms")
    # Alternating rounds, the best of each (load only slows things down), as the races. Two workloads:
    # answers of max_tokens (what batching speeds up), and the model's own answers, which end where it
    # says (a demo model's are short: each request's prompt pass and HTTP work weigh as much).
    rounds, seconds, max_tokens = (1, 1, 16) if quick else (3, 15, 128)
    results["tokens_per_s"] = {}
    for workload, ignore_eos in (("fixed_length", True), ("own_length", False)):
        one = eight = 0
        for _ in range(rounds):
            one = max(one, clients_throughput(url, 1, seconds, max_tokens, headers, ignore_eos)[0])
            tokens_per_s, tokens_per_answer = clients_throughput(url, 8, seconds, max_tokens, headers, ignore_eos)
            eight = max(eight, tokens_per_s)
        results["tokens_per_s"][workload] = {"one_client": one, "eight_clients": eight, "ratio": eight / one,
                                             "tokens_per_answer": tokens_per_answer, "max_tokens": max_tokens,
                                             "rounds": rounds, "seconds": seconds}
        log(f"tokens/s, {workload} answers ({tokens_per_answer:.0f} tokens): 1 client {one:.0f}, "
            f"8 clients {eight:.0f} ({eight / one:.2f}x)")
    results["mixed"] = mixed_load(url, pid, requests, 8, 32, headers, log)
    results["health"] = httpx.get(f"{url}/health").json()
    return results




def run(args):
    """serve.py on args.serve, in a process of its own, measured from this one; prints the report (or the
    JSON) and returns the results."""
    started, log = time.perf_counter(), stderr_log()
    requests = 40 if args.quick else args.serve_requests
    # One torch thread on CPU unless --threads says otherwise, as the races run (common.use_threads).
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or 1)} if args.device == "cpu" else None
    with tempfile.TemporaryDirectory() as tmp, \
            running_server(args.serve, os.path.join(tmp, "serve.log"), "--device", args.device,
                           "--max_batch_size", 8, *(["--compile"] if args.compile else []), env=env) as (process, url):
        log(f"serve.py up at {url}")
        results = {"machine": machine(torch.device(args.device)), "model": args.serve,
                   **measure_serving(url, process.pid, args.quick, requests, log=log)}
    results["seconds"] = time.perf_counter() - started
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_report(results, requests)
    return results


def print_report(results, requests):
    t, r = results["tokens_per_s"], results["mixed"]
    print(f"Tiny-LLM serving bench: {machine_summary(results['machine'])}; model {results['model']}")
    print(f"time to first token (idle server, short chat prompt, streaming): median "
          f"{results['ttft_ms']['median']:.1f} ms, best {results['ttft_ms']['best']:.1f} ms (goal < 100 ms)")
    for workload, w in t.items():
        print(f"aggregate generated tokens/s of streaming clients asking for {w['seconds']} s, {workload} answers "
              f"({w['tokens_per_answer']:.0f} tokens on average, max_tokens {w['max_tokens']}), best of {w['rounds']} "
              f"alternating rounds: 1 client {w['one_client']:.0f}, 8 clients {w['eight_clients']:.0f}: "
              f"{w['ratio']:.2f}x (goal >= 3x)")
    print(f"{requests} requests from 8 clients: valid {r['good']['as_expected']}/{r['good']['sent']} answered "
          f"in full, malformed {r['bad']['as_expected']}/{r['bad']['sent']} got a 4xx JSON error, "
          f"{r['leave']['sent']} left mid-stream; server RSS (MB) every tenth: "
          + " ".join(f"{mb:.0f}" for mb in r["rss_mb"]))
    print(f"server counters at the end: {results['health']['finished']}")
