"""Requests per minute and latency of `sdort serve` under concurrent clients.

    python benchmarks/bench_serve.py models/tiny --clients 4 --requests 40 --concurrency 1 2 \\
        --out benchmarks/results/bench_serve_tiny.json

For each --max-concurrency value, starts a real `sdort serve` (a subprocess on a free local port, a
queue large enough that nothing is refused), sends one warm-up request, then has --clients threads
post txt2img requests (each its own seed) until --requests have been answered. Reports requests per
minute over the wall time and each request's latency (p50, p95: queueing included, as a client sees it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict) -> float:
    """Seconds until the answer of one txt2img request (which must be 200)."""
    request = urllib.request.Request(url + "/sdapi/v1/txt2img", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        response.read()
        assert response.status == 200
    return time.perf_counter() - start


def start_server(model: Path, concurrency: int, clients: int, provider: str):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sdort.runtime.cli", "serve", "--model", str(model), "--port", str(port),
         "--max-concurrency", str(concurrency), "--queue-size", str(clients), "--provider", provider],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sdort serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return process, url
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError("sdort serve did not answer /health within 300 s")


def measure(url: str, clients: int, requests: int, body: dict) -> dict:
    post(url, {**body, "seed": 0})  # warm-up: the first run allocates the sessions' buffers
    latencies, lock, counter = [], threading.Lock(), iter(range(1, requests + 1))

    def client():
        while True:
            with lock:
                seed = next(counter, None)
            if seed is None:
                return
            seconds = post(url, {**body, "seed": seed})
            with lock:
                latencies.append(seconds)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {"requests": len(ordered), "wall_s": round(wall, 3), "requests_per_minute": round(60 * len(ordered) / wall, 1),
            "latency_p50_s": round(statistics.median(ordered), 3),
            "latency_p95_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=40, help="requests per --concurrency value")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2], help="--max-concurrency values")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--sampler", default="Euler a")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_serve.json"))
    args = parser.parse_args()
    body = {"prompt": "a lighthouse at dusk", "steps": args.steps, "width": args.size, "height": args.size,
            "sampler_name": args.sampler}
    rows = []
    for concurrency in args.concurrency:
        process, url = start_server(args.model, concurrency, args.clients, args.provider)
        try:
            rows.append({"max_concurrency": concurrency, **measure(url, args.clients, args.requests, body)})
        finally:
            process.terminate()
            process.wait(timeout=60)
        print(rows[-1], flush=True)
    print("\n| --max-concurrency | requests/min | p50 latency s | p95 latency s |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['max_concurrency']} | {row['requests_per_minute']} | {row['latency_p50_s']} | {row['latency_p95_s']} |")
    result = {"model": str(args.model), "clients": args.clients, "request": body, "provider": args.provider,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.partial")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)  # no half-written result
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
