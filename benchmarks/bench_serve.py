"""Load test of ``tinygptv serve`` on loopback: concurrent OpenAI clients, with and without batching.

    python benchmarks/bench_serve.py                     # 32 clients x 5 requests, built-in model
    python benchmarks/bench_serve.py --model DIR --max-tokens 64

For each configuration the server is started as its own process (``tinygptv serve`` on a free
127.0.0.1 port) and stopped afterwards: batching on (``--max-batch-size``, default 16), batching off
(max batch 1), and streaming (each stream runs alone; time to first token measured). Every client
sends its requests one after another through the official ``openai`` client: an image as a data URL
and a question, greedy, ``max_tokens`` fixed. Printed: failures, latency p50/p95, requests/s and
completion tokens/s, and the throughput ratio batched / one at a time of this run.

Without ``--model`` the built-in model is used if this installation has it, else the tiny random
model (``--random-preset`` picks another preset; saved to a temporary directory; with random weights
no answer stops early, so every answer is ``max_tokens`` long). The test is bounded: a fixed number of requests, a per-request timeout and an overall
deadline, after which the remaining requests count as failures.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

QUESTIONS = ["what color is the circle ?", "describe the image", "where is the circle ?", "what shape is it ?"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: built-in, else a tiny random model)")
    p.add_argument("--random-preset", default=None, help="instead, random weights of this preset (e.g. tinygptv-micro)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=5, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server (default 1)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per request")
    p.add_argument("--deadline", type=float, default=900, help="seconds per configuration, then stop")
    p.add_argument("--no-stream", action="store_true", help="skip the streaming configuration")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, label = resolve_model(args.model, args.random_preset, Path(tmp))
        configs = [("batched", args.max_batch_size, False), ("one at a time", 1, False)]
        if not args.no_stream:
            configs.append(("streaming", args.max_batch_size, True))
        results = {}
        for name, batch, stream in configs:
            results[name] = run_config(model_dir, batch, stream, args)
            print(f"{name}: {results[name]}", flush=True)
    report(results, label, args)


def resolve_model(model: str | None, preset: str | None, tmp: Path) -> tuple[str, str]:
    if model:
        return model, model
    if preset is None:
        from tinygptv.inference import BUILTIN_NAME, builtin_model_dir

        try:
            return str(builtin_model_dir()), f"built-in {BUILTIN_NAME}"
        except FileNotFoundError:
            preset = "tinygptv-tiny"
    import torch

    from tinygptv.model.tinygptv import TinyGPTV
    from tinygptv.testing import word_tokenizer

    torch.manual_seed(0)
    TinyGPTV(preset, tokenizer=word_tokenizer()).save_pretrained(tmp / preset)
    return str(tmp / preset), f"{preset} with random weights (answers never stop early)"


def image_url() -> str:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (224, 224), "white")
    ImageDraw.Draw(img).ellipse([40, 60, 140, 160], fill="red")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def run_config(model_dir: str, max_batch: int, stream: bool, args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "tinygptv",
        "serve",
        "--model",
        model_dir,
        "--port",
        str(port),
        "--max-batch-size",
        str(max_batch),
        "--max-queue",
        str(2 * args.clients),
        "--threads",
        str(args.threads),
    ]
    server = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
    )
    try:
        name = wait_ready(server, port)
        return load(f"http://127.0.0.1:{port}/v1", name, stream, args)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def wait_ready(server: subprocess.Popen, port: int, timeout: float = 300) -> str:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read()[-2000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()["model"]
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("the server did not start")


def load(base_url: str, model: str, stream: bool, args) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=args.timeout)
    url = image_url()
    latencies, first_tokens, tokens, failures = [], [], [], []
    lock = threading.Lock()
    deadline = time.monotonic() + args.deadline

    def one(k: int) -> None:
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": QUESTIONS[k % len(QUESTIONS)]},
                ],
            }
        ]
        start = time.perf_counter()
        first, n_tokens = None, 0
        if stream:
            chunks = client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=args.max_tokens,
                stream=True,
                stream_options={"include_usage": True},
            )
            for chunk in chunks:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - start
                if chunk.usage is not None:
                    n_tokens = chunk.usage.completion_tokens
        else:
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens)
            n_tokens = reply.usage.completion_tokens
        with lock:
            latencies.append(time.perf_counter() - start)
            tokens.append(n_tokens)
            if first is not None:
                first_tokens.append(first)

    def client_loop(c: int) -> None:
        for r in range(args.requests):
            if time.monotonic() > deadline:
                with lock:
                    failures.append("deadline")
                continue
            try:
                one(c * args.requests + r)
            except Exception as err:  # counted and reported, the load test goes on
                with lock:
                    failures.append(f"{type(err).__name__}: {err}")

    one(0)  # warm-up, not counted
    latencies.clear(), first_tokens.clear(), tokens.clear()
    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(args.clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    out = {
        "requests": len(latencies) + len(failures),
        "failures": len(failures),
        "p50_s": round(percentile(latencies, 50), 3),
        "p95_s": round(percentile(latencies, 95), 3),
        "req_per_s": round(len(latencies) / wall, 2),
        "tok_per_s": round(sum(tokens) / wall, 1),
        "wall_s": round(wall, 1),
    }
    if first_tokens:
        out["ttft_p50_s"] = round(percentile(first_tokens, 50), 3)
    if failures:
        out["first_failure"] = failures[0]
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def report(results: dict, label: str, args) -> None:
    print(
        f"\nmodel: {label}; {args.clients} clients x {args.requests} requests, max_tokens {args.max_tokens}, "
        f"server torch threads {args.threads}, {os.cpu_count()} CPUs"
    )
    print("| configuration | requests | failures | p50 s | p95 s | req/s | completion tok/s | TTFT p50 s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['requests']} | {r['failures']} | {r['p50_s']} | {r['p95_s']} | {r['req_per_s']} | "
            f"{r['tok_per_s']} | {r.get('ttft_p50_s', '')} |"
        )
    batched, single = results["batched"]["req_per_s"], results["one at a time"]["req_per_s"]
    if single:
        print(f"batching raises throughput {batched / single:.2f}x (max batch {args.max_batch_size} vs 1, same run)")


if __name__ == "__main__":
    main()
