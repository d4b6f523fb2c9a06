"""`posttrain serve` under load: many concurrent OpenAI clients over many LoRA adapters, against the server a user
would write by hand and against the base model served alone.

    python benchmarks/serve_load.py                                    # 32 clients x 8 adapters, ~4 minutes
    python benchmarks/serve_load.py --clients 4 --adapters 2 --requests 2 --max-tokens 8    # a smoke run

What runs. The toy kit's tiny model (``posttrain.toy.build_toy``) is the base; ``--adapters`` LoRA adapters are made
on it with peft (rank 8 on every linear layer of the decoder, B drawn at random instead of peft's zeros, so each
adapter answers differently) and saved. Three servers, one after the other, each a subprocess on a free loopback
port with ``OMP_NUM_THREADS=--threads`` (default 1), started, waited for on ``/health``, warmed up, measured, and
stopped with SIGTERM:

1. ``posttrain``: ``posttrain serve BASE --adapter a0=... a1=...`` (every adapter pinned), its defaults otherwise;
2. ``naive``: the server a user would write (this file, ``--naive-server``): FastAPI + uvicorn, one peft model
   holding every adapter, and per request, under one lock, ``set_adapter(name)`` then transformers ``generate``,
   its tokens streamed as they come (a per-token streamer, so the first token is sent as soon as it exists);
3. ``base``: ``posttrain serve BASE`` with no adapter, every request asking for the base model.

The load. ``--clients`` concurrent ``openai.AsyncOpenAI`` clients on ``http://127.0.0.1:PORT/v1``; client ``i``
asks for adapter ``a{i mod M}`` (the base model on server 3) and sends ``--requests`` streaming chat completions
one after another (a closed loop): the kit's RL prompts in order, rendered by each server with the model's chat
template, greedy (temperature 0), ``max_tokens=--max-tokens``, ``logprobs: true``, ``stream_options.include_usage``.
Every server gets the same requests. Why logprobs: the toy model is untrained and its greedy text is mostly byte
tokens of incomplete UTF-8 characters, which a server rightly holds back; with logprobs every token is streamed as
its own chunk, so the first token is seen when it is made. Warm-up: one request per client, all at once, not timed. Then the timed run.

How it is measured. Requests/s and output tokens/s (the ``usage.completion_tokens`` of the final chunk) over the
wall time from the first request sent to the last stream closed; per request, the time to first token (the first
chunk carrying text, a token's log-prob or a finish reason) and the latency (to the end of the stream), p50 and p99. The server's CPU
share (its user+system time from ``/proc/PID/stat`` over the timed wall time) shows whether it had its cores. Memory
per added adapter: (VmRSS of server 1 - VmRSS of server 3) / M, both read from ``/proc/PID/status`` after their
warm-up, beside the adapters' own weight bytes. The answers of servers 1 and 2 (same adapters, greedy) are compared
request by request (text and token list): they should be the same, which also says both did the same work.

Targets (issue 18, 2 CPU cores, tiny model, 32 clients x 8 adapters): ``posttrain`` >= 3x ``naive`` requests/s,
and ``posttrain`` >= 0.8x ``base`` output tokens/s (tokens, not requests: greedy answers of the base and of the
adapters end at different lengths). The machine should be idle: the clients, in this process, share the cores
with the server.

The LAST line printed is one JSON object: per server its figures (``{server}_requests_s``, ``_output_tokens_s``,
``_ttft_p50_s``, ``_ttft_p99_s``, ``_latency_p50_s``, ``_latency_p99_s``, ``_cpu_share``, ``_rss_mib``,
``_exit_code``), ``speedup_vs_naive``, ``adapter_throughput_ratio``, ``target_speedup_met``,
``target_adapter_ratio_met``, ``rss_per_adapter_mib``, ``adapter_weights_mib``, ``same_answers_as_naive`` and the
settings. ``--record`` writes the table and figures to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import add_results_option, emit_results, offline_env

from posttrain.runtime.distributed import free_loopback_port

TARGET_SPEEDUP_VS_NAIVE = 3.0
TARGET_ADAPTER_RATIO = 0.8
KIT_COUNTS = {"sft": 200, "prefs": 10, "prompts": 400, "eval": 10, "pretrain": 10}  # the prompts are what is used
LORA_RANK = 8
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_B_STD = 0.02  # peft starts B at zero (the adapter is the base); a random B makes each adapter its own model
SERVER_START_TIMEOUT_S = 180.0
SERVER_STOP_TIMEOUT_S = 90.0
SERVERS = ("posttrain", "naive", "base")


# ---------------------------------------------------------------------------------------------- the naive server
def naive_server(base: str, adapters: dict[str, str], port: int) -> None:
    """The server a user would write: every adapter in one peft model, one request at a time, ``set_adapter`` and
    ``generate`` per request. It answers just what the benchmark sends: streaming, greedy chat completions."""
    import torch
    import uvicorn
    from fastapi import Body, FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList
    from transformers.generation.streamers import BaseStreamer

    tokenizer = AutoTokenizer.from_pretrained(base)
    names = list(adapters)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters[names[0]], names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    one_at_a_time = asyncio.Lock()
    app = FastAPI()

    class TokenStreamer(BaseStreamer):
        """Hands each new token to the event loop as soon as ``generate`` makes it, with its log-prob (transformers'
        TextIteratorStreamer holds text back until a word ends, which would delay the first token). Text that ends
        in an incomplete UTF-8 character is held back until the character completes, as posttrain does. Also a
        logits processor (``__call__``): it keeps each step's log-probs for the token chosen from them."""

        def __init__(self, loop: asyncio.AbstractEventLoop, tokens: asyncio.Queue[dict[str, Any] | None]) -> None:
            self.loop, self.tokens = loop, tokens
            self.token_ids: list[int] = []
            self.prompt_seen = False
            self.sent_chars = 0
            self.step_log_probs: torch.Tensor | None = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.step_log_probs = scores[0].float().log_softmax(-1)
            return scores

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:  # generate's first put is the prompt
                self.prompt_seen = True
                return
            token_id = int(value.reshape(-1)[0])
            self.token_ids.append(token_id)
            self._send(token_id, self.decoded_text().rstrip("\ufffd"))

        def end(self) -> None:
            self._send(None, self.decoded_text())
            self.loop.call_soon_threadsafe(self.tokens.put_nowait, None)

        def decoded_text(self) -> str:
            return tokenizer.decode(self.token_ids, skip_special_tokens=True)

        def _send(self, token_id: int | None, visible: str) -> None:
            new_text = visible[self.sent_chars :]
            self.sent_chars = max(self.sent_chars, len(visible))
            logprobs = []
            if token_id is not None and self.step_log_probs is not None:
                token = tokenizer.decode([token_id])
                logprob = float(self.step_log_probs[token_id])
                logprobs = [{"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []}]
            if new_text or logprobs:
                self.loop.call_soon_threadsafe(self.tokens.put_nowait, {"content": new_text, "logprobs": logprobs})

    def error(status: int, message: str) -> Any:
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
        return JSONResponse(body, status_code=status)

    def chunk(model_name: str, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body = {"id": "chatcmpl-naive", "object": "chat.completion.chunk", "created": int(time.time())}
        return "data: " + json.dumps({**body, "model": model_name, "choices": choices, "usage": usage}) + "\n\n"

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: dict[str, Any] = Body()) -> Any:  # noqa: B008 (FastAPI's way to take the body)
        name = body.get("model")
        if name not in adapters:
            return error(404, f"the model {name!r} does not exist")
        if not body.get("stream") or body.get("temperature", 1.0) != 0 or not body.get("logprobs"):
            return error(400, "this server answers streaming greedy requests with logprobs only")
        text = tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        loop = asyncio.get_running_loop()

        async def stream() -> Any:
            async with one_at_a_time:
                tokens: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
                streamer = TokenStreamer(loop, tokens)
                model.set_adapter(name)
                generation = asyncio.create_task(
                    asyncio.to_thread(
                        model.generate,
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        max_new_tokens=body["max_tokens"],
                        do_sample=False,
                        eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id,
                        streamer=streamer,
                        logits_processor=LogitsProcessorList([streamer]),
                    )
                )
                generation.add_done_callback(lambda _: tokens.put_nowait(None))  # a failed generate never calls end()
                yield chunk(name, [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                while (token := await tokens.get()) is not None:
                    delta = {"content": token["content"]}
                    logprobs = {"content": token["logprobs"]}
                    yield chunk(name, [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": None}])
                await generation
                generated = len(streamer.token_ids)
                stopped = bool(streamer.token_ids) and streamer.token_ids[-1] == tokenizer.eos_token_id
                yield chunk(name, [{"index": 0, "delta": {}, "finish_reason": "stop" if stopped else "length"}])
                usage = {"prompt_tokens": input_ids.shape[1], "completion_tokens": generated}
                yield chunk(name, [], {**usage, "total_tokens": usage["prompt_tokens"] + generated})
                yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    print(f"naive server on http://127.0.0.1:{port}/v1 ({len(adapters)} adapters)", file=sys.stderr, flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---------------------------------------------------------------------------------------------- the set-up
def make_adapters(base_dir: Path, out_dir: Path, count: int) -> tuple[dict[str, Path], int]:
    """``count`` LoRA adapters on the base, each with its own random A and B; their paths and parameter count each."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths: dict[str, Path] = {}
    parameters = 0
    for index in range(count):
        torch.manual_seed(1000 + index)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base_dir),
            LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"),
        )
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, LORA_B_STD)
        parameters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        paths[f"a{index}"] = out_dir / f"a{index}"
        model.save_pretrained(paths[f"a{index}"])
    return paths, parameters


@dataclass
class RunningServer:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"{self.name}: no VmRSS in /proc/{self.process.pid}/status")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process, all its threads."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(name: str, command: list[str], scratch: Path, threads: int) -> RunningServer:
    """Start ``command`` (its output to a log file) and wait until it answers ``/health``."""
    port = free_loopback_port()
    log = scratch / f"{name}.log"
    threads_env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [*command, "--port", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=offline_env(str(scratch), threads_env),
        )
    server = RunningServer(name, process, port, log)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} server exited with code {process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            time.sleep(0.25)
    stop_server(server)
    raise RuntimeError(f"{name} server not ready after {SERVER_START_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


def stop_server(server: RunningServer) -> int:
    """SIGTERM (a server drains and exits 0), then its exit code; killed if it does not stop in time."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode


# ---------------------------------------------------------------------------------------------- the load
@dataclass
class Timing:
    client: int
    index: int
    ttft_s: float
    latency_s: float
    completion_tokens: int
    answer: tuple[str, tuple[str, ...]]  # the text and its tokens as the server names them


async def one_request(client: Any, model: str, messages: list[dict[str, str]], max_tokens: int) -> Timing:
    started = time.perf_counter()
    first = None
    parts: list[str] = []
    tokens: list[str] = []
    completion_tokens = None
    stream = await client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        logprobs=True,  # every token its own chunk: the toy model's text is often a held-back partial character
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            completion_tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            new_tokens = [t.token for t in choice.logprobs.content or ()] if choice.logprobs else []
            if first is None and (choice.delta.content or new_tokens or choice.finish_reason):
                first = time.perf_counter()
            parts.append(choice.delta.content or "")
            tokens += new_tokens
    ended = time.perf_counter()
    if first is None or completion_tokens is None:
        raise RuntimeError(f"{model}: a stream without {'tokens' if first is None else 'usage'}")
    return Timing(-1, -1, first - started, ended - started, completion_tokens, ("".join(parts), tuple(tokens)))


async def run_load(
    url: str, models: list[str], prompts: list[list[dict[str, str]]], requests: int, max_tokens: int, offset: int
) -> tuple[list[Timing], float]:
    """Client ``i`` (one per entry of ``models``) sends ``requests`` requests in turn; every timing, and the wall
    time from the first request to the last answer. ``offset``: the first request number of each client."""
    from openai import AsyncOpenAI

    clients = [AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) for _ in models]

    async def client_loop(i: int) -> list[Timing]:
        timings = []
        for j in range(offset, offset + requests):
            timing = await one_request(clients[i], models[i], prompts[(i * 997 + j) % len(prompts)], max_tokens)
            timing.client, timing.index = i, j
            timings.append(timing)
        return timings

    started = time.perf_counter()
    try:
        per_client = await asyncio.gather(*(client_loop(i) for i in range(len(models))))
    finally:
        for client in clients:
            await client.close()
    return [t for timings in per_client for t in timings], time.perf_counter() - started


def quantile(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1] if len(values) > 1 else values[0]
    )


def measure(
    server: RunningServer, models: list[str], prompts: list[list[dict[str, str]]], requests: int, max_tokens: int
) -> dict[str, Any]:
    """Warm the server up (one request per client, at once), read its memory, then time the load."""
    asyncio.run(run_load(server.url, models, prompts, 1, max_tokens, offset=requests))
    rss_mib = server.rss_mib()
    cpu_before = server.cpu_seconds()
    timings, wall_s = asyncio.run(run_load(server.url, models, prompts, requests, max_tokens, offset=0))
    cpu_share = (server.cpu_seconds() - cpu_before) / wall_s
    ttft = [t.ttft_s for t in timings]
    latency = [t.latency_s for t in timings]
    return {
        "requests_s": len(timings) / wall_s,
        "output_tokens_s": sum(t.completion_tokens for t in timings) / wall_s,
        "ttft_p50_s": quantile(ttft, 0.5),
        "ttft_p99_s": quantile(ttft, 0.99),
        "latency_p50_s": quantile(latency, 0.5),
        "latency_p99_s": quantile(latency, 0.99),
        "mean_completion_tokens": statistics.fmean(t.completion_tokens for t in timings),
        "wall_s": wall_s,
        "cpu_share": cpu_share,
        "rss_mib": rss_mib,
        "answers": {(t.client, t.index): t.answer for t in timings},
    }


def served_models(server: RunningServer) -> dict[str, str | None]:
    """``/v1/models`` of a posttrain server: id -> parent."""
    with urllib.request.urlopen(server.url + "/v1/models", timeout=10) as answer:
        return {m["id"]: m["parent"] for m in json.load(answer)["data"]}


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| server | requests/s | output tokens/s | TTFT p50 s | TTFT p99 s | latency p50 s | latency p99 s | "
        "tokens/answer | server CPU share | RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['requests_s']:.2f} | {r['output_tokens_s']:.1f} | {r['ttft_p50_s']:.3f} | "
            f"{r['ttft_p99_s']:.3f} | {r['latency_p50_s']:.3f} | {r['latency_p99_s']:.3f} | "
            f"{r['mean_completion_tokens']:.1f} | {r['cpu_share']:.2f} | {r['rss_mib']:.0f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent OpenAI clients")
    parser.add_argument("--adapters", type=int, default=8, help="LoRA adapters, client i uses adapter i mod M")
    parser.add_argument("--requests", type=int, default=20, help="timed requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (greedy)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server (OMP_NUM_THREADS)")
    parser.add_argument("--naive-server", metavar="BASE", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    add_results_option(parser)
    args = parser.parse_args()
    if args.naive_server:
        naive_server(args.naive_server, dict(a.split("=", 1) for a in args.adapter), args.port)
        return
    for option in ("clients", "adapters", "requests", "max_tokens", "threads"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")

    import torch

    from posttrain.toy import build_toy

    torch.set_num_threads(1)  # this process only builds the kit and runs the clients
    results: dict[str, dict[str, Any]] = {}
    exit_codes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="serve_load-") as scratch_name:
        scratch = Path(scratch_name)
        print("toy kit and adapters (not timed)", file=sys.stderr, flush=True)
        kit = build_toy(scratch / "kit", size="tiny", seed=0, **KIT_COUNTS)
        base = str(kit.model.resolve())
        adapters, adapter_parameters = make_adapters(kit.model.resolve(), scratch / "adapters", args.adapters)
        prompts = [json.loads(line)["messages"] for line in kit.prompts.read_text().splitlines()]
        adapter_flags = [f for name, path in adapters.items() for f in ("--adapter", f"{name}={path}")]
        names = list(adapters)
        commands = {
            "posttrain": [sys.executable, "-m", "posttrain", "serve", base, *adapter_flags],
            "naive": [sys.executable, str(Path(__file__).resolve()), "--naive-server", base, *adapter_flags],
            "base": [sys.executable, "-m", "posttrain", "serve", base],
        }
        for name in SERVERS:
            print(f"{name}: starting", file=sys.stderr, flush=True)
            server = start_server(name, commands[name], scratch, args.threads)
            try:
                if name == "base":
                    models = [next(m for m, parent in served_models(server).items() if parent is None)]
                    client_models = models * args.clients
                else:
                    if name == "posttrain" and not set(names) <= set(served_models(server)):
                        raise RuntimeError(f"posttrain serves {sorted(served_models(server))}, expected {names}")
                    client_models = [names[i % len(names)] for i in range(args.clients)]
                results[name] = measure(server, client_models, prompts, args.requests, args.max_tokens)
            except BaseException:
                print(f"{name} server log:\n{server.log_tail()}", file=sys.stderr)
                raise
            finally:
                exit_codes[name] = stop_server(server)
            r = results[name]
            print(
                f"{name}: {r['requests_s']:.2f} requests/s, {r['output_tokens_s']:.1f} tokens/s, "
                f"TTFT p50 {r['ttft_p50_s']:.3f} s, exit code {exit_codes[name]}",
                file=sys.stderr,
                flush=True,
            )

    answers = {name: results[name].pop("answers") for name in SERVERS}
    same = sum(answers["posttrain"][key] == text for key, text in answers["naive"].items()) / len(answers["naive"])
    out: dict[str, Any] = {
        "clients": args.clients,
        "adapters": args.adapters,
        "requests_per_client": args.requests,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "cpus": os.cpu_count(),
    }
    for name in SERVERS:
        out.update({f"{name}_{figure}": value for figure, value in results[name].items()})
        out[f"{name}_exit_code"] = exit_codes[name]
    out["speedup_vs_naive"] = results["posttrain"]["requests_s"] / results["naive"]["requests_s"]
    out["adapter_throughput_ratio"] = results["posttrain"]["output_tokens_s"] / results["base"]["output_tokens_s"]
    out["target_speedup_met"] = out["speedup_vs_naive"] >= TARGET_SPEEDUP_VS_NAIVE
    out["target_adapter_ratio_met"] = out["adapter_throughput_ratio"] >= TARGET_ADAPTER_RATIO
    out["rss_per_adapter_mib"] = (results["posttrain"]["rss_mib"] - results["base"]["rss_mib"]) / args.adapters
    out["adapter_weights_mib"] = adapter_parameters * 4 / 2**20  # float32
    out["same_answers_as_naive"] = same
    out["load_avg_1min"] = os.getloadavg()[0]

    lines = table(results)
    print("\n".join(lines))

    def verdict(met: bool) -> str:
        return "met" if met else "NOT met"

    print(
        f"posttrain / naive requests/s: x{out['speedup_vs_naive']:.2f} (target >= {TARGET_SPEEDUP_VS_NAIVE}: "
        f"{verdict(out['target_speedup_met'])}); posttrain / base output tokens/s: "
        f"{out['adapter_throughput_ratio']:.2f} (target >= {TARGET_ADAPTER_RATIO}: "
        f"{verdict(out['target_adapter_ratio_met'])}); memory per added adapter {out['rss_per_adapter_mib']:.2f} MiB "
        f"(its weights {out['adapter_weights_mib']:.2f} MiB); answers equal to the naive server's: {same:.0%}"
    )
    if exit_codes["posttrain"] != 0 or exit_codes["base"] != 0:  # the naive server is no part of the contract
        print(f"WARNING: posttrain serve did not exit 0 on SIGTERM: {exit_codes}", file=sys.stderr)
    emit_results(out, args.record, lines)


if __name__ == "__main__":
    main()
