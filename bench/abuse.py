"""What hostile or careless clients cost a running `sc2deploy serve`: oversize prompts and silent calls.

Starts the server as a subprocess (eager runtime, `--size`, random weights), then measures, against
one greedy stream running throughout:
  - baseline: the stream's inter-token latency (p50/p99) with nothing else going on;
  - oversize: the same while `--flooders` clients loop prompts just under the message limit (4 MiB)
    and prompts of 400 kB (over the context, but under its byte bound, so they are tokenized in part):
    how long each refusal takes (p50/p99, client side) and what it does to the stream;
  - silent: the same while `--silent` calls send their headers and never their message: health-check
    latency and a keyless request's latency while they are held.
The stream's inter-token p99 under each load minus the baseline's is what a running user feels.

    python bench/abuse.py                        # tiny preset, 10 s per phase
    python bench/abuse.py --size bench --duration 20 --json abuse.json
Not a test: numbers depend on the machine and on whatever else runs on it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import grpc.aio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sc2deploy.serving.client import Client, make_request  # noqa: E402

LINE = "def f(x):\n    return x * 2\n"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def summary(values: list[float]) -> dict:
    return {"n": len(values), "p50_ms": round(1000 * percentile(values, 50), 2),
            "p99_ms": round(1000 * percentile(values, 99), 2)}


def start_server(args) -> tuple[subprocess.Popen, int]:
    command = [sys.executable, "-m", "sc2deploy.cli", "serve", "--size", args.size, "--backend", "eager",
               "--host", "127.0.0.1", "--port", "0", "--max-batch", "4", "--log-level", "warning",
               "--read-timeout", str(args.duration * 4)]
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if match:
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
            return process, int(match.group(1))
    raise SystemExit(f"the server did not start (exit {process.wait()})")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stream_gaps(client: Client, seconds: float) -> list[float]:
    """Inter-token gaps of greedy streams run back to back for `seconds`."""
    gaps: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        last = None
        for chunk in client.stream(make_request("def fibonacci(n):\n", max_tokens=200), timeout=120):
            now = time.monotonic()
            if last is not None and chunk.token_ids:
                gaps.append(now - last)
            last = now
            if now > end:
                break
    return gaps


def flood(target: str, size: int, seconds: float, latencies) -> None:
    """One flooding client (its own process, so that its serializing does not slow the measuring one)."""
    client = Client(target, max_message_bytes=8 << 20)
    request = make_request((LINE * (size // len(LINE) + 1))[:size], max_tokens=4)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.monotonic()
        try:
            client.complete(request, timeout=60)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        latencies.append(time.monotonic() - start)
    client.close()


async def hold_silent_calls(target: str, count: int, stop: threading.Event) -> None:
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(8)]

    async def nothing():
        while not stop.is_set():
            await asyncio.sleep(0.1)
        return
        yield b""  # pragma: no cover

    async def one(i: int) -> None:
        call = channels[i % len(channels)].stream_unary("/sc2deploy.v1.CompletionService/Complete",
                                                         request_serializer=lambda b: b,
                                                         response_deserializer=lambda b: b)
        try:
            await call(nothing())
        except grpc.aio.AioRpcError:
            pass

    await asyncio.gather(*(one(i) for i in range(count)))
    for channel in channels:
        await channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", help="size preset of the served random model (default tiny)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase (default 10)")
    parser.add_argument("--flooders", type=int, default=4, help="clients looping oversize prompts (default 4)")
    parser.add_argument("--silent", type=int, default=200, help="calls that never send their message (default 200)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    process, port = start_server(args)
    target = f"127.0.0.1:{port}"
    client = Client(target)
    results: dict = {"size": args.size, "duration_s": args.duration}
    try:
        client.wait_ready(60)
        stream_gaps(client, 2.0)  # warm-up
        results["baseline_itl"] = summary(stream_gaps(client, args.duration))
        print(f"baseline: inter-token {results['baseline_itl']}", file=sys.stderr, flush=True)

        spawn = multiprocessing.get_context("spawn")
        for size in (4_000_000, 400_000):
            with spawn.Manager() as manager:
                latencies = manager.list()
                flooders = [spawn.Process(target=flood, args=(target, size, args.duration + 1.0, latencies))
                            for _ in range(args.flooders)]
                for f in flooders:
                    f.start()
                time.sleep(1.0)  # the flooders are running
                cpu, count = cpu_seconds(process.pid), len(latencies)
                gaps = stream_gaps(client, args.duration)
                cpu, count = cpu_seconds(process.pid) - cpu, len(latencies) - count
                for f in flooders:
                    f.join()
                latencies = list(latencies)
            # the server's CPU per refusal, an upper bound: the stream's decoding is in it too
            results[f"oversize_{size}"] = {"refusal": summary(latencies), "itl": summary(gaps),
                                           "server_cpu_ms_per_refusal": round(1000 * cpu / max(count, 1), 2)}
            print(f"{args.flooders} clients looping {size}-byte prompts: {results[f'oversize_{size}']}",
                  file=sys.stderr, flush=True)

        stop = threading.Event()
        holder = threading.Thread(target=lambda: asyncio.run(hold_silent_calls(target, args.silent, stop)))
        holder.start()
        time.sleep(1.0)
        health, requests = [], []
        end = time.monotonic() + args.duration / 2
        while time.monotonic() < end:
            start = time.monotonic()
            assert client.health() == "SERVING"
            health.append(time.monotonic() - start)
            start = time.monotonic()
            client.complete(make_request("x = ", max_tokens=4), timeout=30)
            requests.append(time.monotonic() - start)
        gaps = stream_gaps(client, args.duration / 2)
        stop.set()
        holder.join()
        results["silent_calls"] = {"held": args.silent, "health": summary(health), "request_4_tokens": summary(requests),
                                   "itl": summary(gaps)}
        print(f"{args.silent} silent calls held: {results['silent_calls']}", file=sys.stderr, flush=True)
    finally:
        client.close()
        process.terminate()
        process.wait(60)
    base = results["baseline_itl"]["p99_ms"]
    for key in ("oversize_4000000", "oversize_400000", "silent_calls"):
        results[key]["itl_p99_delta_ms"] = round(results[key]["itl"]["p99_ms"] - base, 2)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
