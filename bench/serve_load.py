"""Load benchmark of `sc2deploy serve`: 1, 4, 16 and 64 concurrent streaming clients.

Starts the server as a subprocess (bench preset, best CPU runtime: ONNX Runtime when an export
exists or can be made, else eager; or --backend cuda on a GPU host), then for each concurrency level runs that many clients for
a fixed time, each sending streaming completions back to back (all clients start together).
Reports generated tokens/s over the measured window (after --warmup), time to first token
p50/p99 (request sent -> first token received, queueing and prefill included; every request of
the level, the simultaneous first wave too) and inter-token latency p50/p99 (gaps between
consecutive tokens of one stream, in the window), and the 16-client / 1-client throughput ratio
that continuous batching is meant to raise.

--protocol picks the clients: gRPC (CompleteStream, the default) or HTTP (OpenAI's streaming
POST /v1/completions over httpx, server started with --http-port 0), or both: one server, and per
level and repeat a gRPC run then an HTTP run, plus a table of HTTP / gRPC throughput and the extra
TTFT p50 of HTTP. HTTP counts one token per server-sent chunk with text (the server sends a chunk per
decode step, leaving out steps whose text it holds back, e.g. half a UTF-8 character) and adds the
tokens it left out from the `usage` chunk at the end (stream_options.include_usage); `logprobs`
would give exact per-chunk tokens but makes the server compute a log-softmax per token, which gRPC
is not asked to do.

    python bench/serve_load.py                       # auto backend, 20 s per level
    python bench/serve_load.py --backend eager --duration 30 --json results.json
    python bench/serve_load.py --backend cuda --size 3b --levels 1,16 --duration 10   # a GPU host
    python bench/serve_load.py --protocol both --levels 16 --repeat 3   # HTTP vs gRPC, same server
Not a test: numbers depend on the machine and on whatever else runs on it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from sc2deploy.serving.client import Client, make_request  # noqa: E402

SNIPPETS = ["import os\nimport sys\n\n", "class Cache:\n    def __init__(self, size):\n        self.size = size\n",
            "def parse(line):\n    key, _, value = line.partition('=')\n", "for i in range(10):\n    total += i\n"]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def prompt(client_id: int, n: int, prompt_chars: int) -> str:
    text = f"# client {client_id} request {n}\n"
    while len(text) < prompt_chars:
        text += SNIPPETS[(client_id + n + len(text)) % len(SNIPPETS)]
    return text[:prompt_chars]


def start_server(args) -> tuple[subprocess.Popen, int, int | None]:
    """The server process, its gRPC port and its HTTP port (None unless --protocol needs HTTP)."""
    command = [sys.executable, "-m", "sc2deploy.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--max-batch", str(args.max_batch), "--max-queue", str(args.max_batch), "--context", str(args.context),
               "--log-level", "warning", "--backend", args.backend, "--prefill-tokens", str(args.prefill_tokens)]
    command += ["--artifact", str(args.artifact)] if args.backend == "ort" else ["--size", args.size]
    if args.backend == "cuda":
        command += ["--dtype", args.dtype]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.protocol != "grpc":
        command += ["--http-port", "0"]
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stderr:
        sys.stderr.write("  server: " + line)
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if match:
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
            http = re.search(r"HTTP on :(\d+)", line)
            if args.protocol != "grpc" and not http:
                raise SystemExit("the server does not serve HTTP (no `HTTP on :PORT` in its start-up line)")
            return process, int(match.group(1)), int(http.group(1)) if http else None
    raise SystemExit(f"the server exited with {process.wait()} before listening")


class GrpcStreams:
    """One client's gRPC channel. tokens(text) streams a completion as (tokens, arrival) pairs: `tokens`
    generated tokens just received, `arrival` False only for a late count of tokens received before;
    closing the generator cancels the call."""

    def __init__(self, endpoints: dict, max_tokens: int):
        self.client, self.max_tokens = Client(endpoints["grpc"]), max_tokens

    def tokens(self, text: str):
        stream = self.client.stream(make_request(text, max_tokens=self.max_tokens), timeout=300)
        try:
            for chunk in stream:
                if chunk.token_ids:
                    yield len(chunk.token_ids), True
        finally:
            stream.cancel()  # a no-op once the call has ended

    def close(self) -> None:
        self.client.close()


class HttpStreams:
    """One client's HTTP connection: the same as GrpcStreams over OpenAI's streaming /v1/completions (one token
    per chunk with text, then those of steps the server sent no text for, from the usage chunk); closing the
    generator closes the response, so the server cancels the request."""

    def __init__(self, endpoints: dict, max_tokens: int):
        self.client = httpx.Client(base_url=endpoints["http"], timeout=300)
        self.model, self.max_tokens = endpoints["model"], max_tokens

    def tokens(self, text: str):
        body = {"model": self.model, "prompt": text, "max_tokens": self.max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        with self.client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.read().decode(errors='replace')[:500]}")
            counted = 0
            for line in response.iter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                data = json.loads(line[5:])
                if "error" in data:
                    raise RuntimeError(f"error event: {data['error']}")
                if data.get("usage"):  # the last chunk
                    missing = data["usage"]["completion_tokens"] - counted
                    if missing > 0:
                        yield missing, counted == 0
                elif data["choices"] and data["choices"][0]["text"] and data["choices"][0]["finish_reason"] is None:
                    counted += 1
                    yield 1, True

    def close(self) -> None:
        self.client.close()


STREAMS = {"grpc": GrpcStreams, "http": HttpStreams}


def run_level(protocol: str, endpoints: dict, clients: int, duration: float, warmup: float, args) -> dict:
    start = time.monotonic() + warmup
    end = start + duration
    lock = threading.Lock()
    tokens_in_window, ttft, itl, requests_done = [0], [], [], [0]

    def client_loop(client_id: int) -> None:
        streams = STREAMS[protocol](endpoints, args.max_tokens)
        n = 0
        while time.monotonic() < end:
            text = prompt(client_id, n, args.prompt_chars)
            n += 1
            sent = last = time.monotonic()
            first = True
            local_itl, local_tokens = [], 0
            with contextlib.closing(streams.tokens(text)) as stream:  # closing it cancels the request
                for count, arrival in stream:
                    now = time.monotonic()
                    if arrival:
                        if first:
                            if now <= end:  # every request answered in time, the first wave's included
                                ttft.append(now - sent)
                            first = False
                        elif start <= now <= end:
                            local_itl.append(now - last)
                        last = now
                    if start <= now <= end:
                        local_tokens += count
                    if now > end:
                        break
            with lock:
                tokens_in_window[0] += local_tokens
                itl.extend(local_itl)
                requests_done[0] += 1
        streams.close()

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"protocol": protocol, "clients": clients, "tokens_per_s": tokens_in_window[0] / duration,
            "requests": requests_done[0],
            "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
            "itl_p50_ms": 1e3 * percentile(itl, 50), "itl_p99_ms": 1e3 * percentile(itl, 99),
            "ttft_samples": len(ttft), "itl_samples": len(itl)}


def row(r: dict, show_protocol: bool) -> str:
    return ((f"{r['protocol']:>8} " if show_protocol else "") +
            f"{r['clients']:>7} {r['tokens_per_s']:>9.1f} {r['ttft_p50_ms']:>7.0f}ms {r['ttft_p99_ms']:>7.0f}ms "
            f"{r['itl_p50_ms']:>6.0f}ms {r['itl_p99_ms']:>6.0f}ms {r['requests']:>8}")


def compare(best: dict, levels: list[int]) -> list[dict]:
    """Per level, HTTP against gRPC (the best run of each): tokens/s and their ratio, TTFT p50 and HTTP's extra."""
    print("HTTP vs gRPC (the best run of each):")
    print(f"{'clients':>7} {'gRPC tok/s':>10} {'HTTP tok/s':>10} {'HTTP/gRPC':>9} {'gRPC TTFT p50':>13} "
          f"{'HTTP TTFT p50':>13} {'extra TTFT':>10}")
    table = []
    for n in levels:
        g, h = best["grpc", n], best["http", n]
        ratio = h["tokens_per_s"] / g["tokens_per_s"] if g["tokens_per_s"] else float("nan")
        c = {"clients": n, "grpc_tokens_per_s": g["tokens_per_s"], "http_tokens_per_s": h["tokens_per_s"],
             "throughput_http_over_grpc": ratio,
             "grpc_ttft_p50_ms": g["ttft_p50_ms"], "http_ttft_p50_ms": h["ttft_p50_ms"],
             "ttft_p50_extra_ms": h["ttft_p50_ms"] - g["ttft_p50_ms"]}
        table.append(c)
        print(f"{n:>7} {c['grpc_tokens_per_s']:>10.1f} {c['http_tokens_per_s']:>10.1f} "
              f"{ratio:>9.1%} {c['grpc_ttft_p50_ms']:>11.1f}ms {c['http_ttft_p50_ms']:>11.1f}ms "
              f"{c['ttft_p50_extra_ms']:>+8.1f}ms")
    return table


def ensure_artifact(args) -> bool:
    """Make the ONNX Runtime export of the preset if it is missing; False when ONNX export is unavailable."""
    if (args.artifact / "sc2deploy.json").is_file():
        return True
    try:
        import onnxruntime  # noqa: F401

        from sc2deploy.cli import main
    except ImportError:
        return False
    print(f"exporting --size {args.size} fp32 to {args.artifact} (once) ...", file=sys.stderr)
    return main(["export", "--size", args.size, "--dtype", "fp32", "--out", str(args.artifact)]) == 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="auto", choices=("auto", "ort", "eager", "cuda"),
                   help="runtime of the server (auto: ort if the export exists or can be made, else eager; "
                        "cuda: the GPU runtime)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="dtype of the cuda backend")
    p.add_argument("--size", default="bench", help="model preset (default bench, ~111M parameters)")
    p.add_argument("--artifact", type=Path, help="ort export to serve (default: a cached export under /tmp)")
    p.add_argument("--levels", default="1,4,16,64", help="concurrent clients per level (default 1,4,16,64)")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per level (default 20)")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each level (default 3)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per level, interleaved; the best is reported (default 1; use 3 on a shared machine)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--prompt-chars", type=int, default=160, help="prompt length in characters (default 160)")
    p.add_argument("--max-batch", type=int, default=64, help="server --max-batch (default 64)")
    p.add_argument("--context", type=int, default=1024, help="server --context (default 1024)")
    p.add_argument("--prefill-tokens", type=int, default=256, help="server --prefill-tokens (default 256)")
    p.add_argument("--threads", type=int, help="server runtime threads (default: all cores)")
    p.add_argument("--protocol", default="grpc", choices=("grpc", "http", "both"),
                   help="clients: gRPC streaming (default), HTTP (OpenAI /v1/completions, SSE), or both against one "
                        "server, each level run over gRPC then HTTP, with an HTTP / gRPC comparison")
    p.add_argument("--server", help="benchmark an already running server at HOST:PORT (gRPC) instead of starting one")
    p.add_argument("--http-server", metavar="HOST:PORT",
                   help="with --server and --protocol http or both: that server's HTTP port")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = p.parse_args()
    args.artifact = args.artifact or Path(f"/tmp/sc2deploy-bench/{args.size}-ort-fp32")
    if args.backend == "auto":
        args.backend = "ort" if ensure_artifact(args) else "eager"
    elif args.backend == "ort" and not ensure_artifact(args):
        raise SystemExit("the ort backend needs onnxruntime and an export (sc2deploy export --target ort)")

    protocols = ("grpc", "http") if args.protocol == "both" else (args.protocol,)
    if args.server and args.protocol != "grpc" and not args.http_server:
        raise SystemExit("--server with --protocol http or both needs --http-server HOST:PORT")

    process = None
    if args.server:
        target, http_target = args.server, args.http_server
    else:
        process, port, http_port = start_server(args)
        target, http_target = f"127.0.0.1:{port}", None if http_port is None else f"127.0.0.1:{http_port}"
    try:
        with Client(target) as client:
            client.wait_ready(120)
            info = client.info()
        endpoints = {"grpc": target}
        if args.protocol != "grpc":
            endpoints["http"] = f"http://{http_target}"
            models = httpx.get(f"http://{http_target}/v1/models", timeout=30)
            models.raise_for_status()
            endpoints["model"] = models.json()["data"][0]["id"]
        print(f"server: {info.size} {info.dtype} on {info.runtime}, max batch {info.max_batch}, "
              f"{os.cpu_count()} CPUs; {args.max_tokens} tokens per request, {args.duration:g} s per level")
        show_protocol = args.protocol != "grpc"
        header = ((f"{'protocol':>8} " if show_protocol else "") +
                  f"{'clients':>7} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} "
                  f"{'requests':>8}")
        levels = [int(x) for x in args.levels.split(",")]
        runs: dict[int, list[dict]] = {n: [] for n in levels}  # every run, in the order run
        print(header)
        for repeat in range(args.repeat):  # levels (and protocols) interleaved: outside load hits one run of each
            for clients in levels:
                for protocol in protocols:
                    load = os.getloadavg()[0]
                    r = run_level(protocol, endpoints, clients, args.duration, args.warmup, args)
                    r["loadavg_before"] = round(load, 2)
                    runs[clients].append(r)
                    note = f"   (run {repeat + 1}, load {load:.1f})" if args.repeat > 1 else ""
                    print(row(r, show_protocol) + note, flush=True)
        best = {(proto, n): max((r for r in runs[n] if r["protocol"] == proto), key=lambda r: r["tokens_per_s"])
                for n in levels for proto in protocols}
        results = list(best.values())
        if args.repeat > 1:
            print(f"best of {args.repeat} runs per level (the one least disturbed by other processes):")
            print(header)
            for r in results:
                print(row(r, show_protocol))
        by = {r["clients"]: r["tokens_per_s"] for r in results if r["protocol"] == protocols[0]}
        summary = {"backend": info.runtime, "size": info.size, "dtype": info.dtype, "cpus": os.cpu_count(),
                   "protocol": args.protocol, "max_tokens": args.max_tokens, "prompt_chars": args.prompt_chars,
                   "duration_s": args.duration, "repeat": args.repeat, "levels": results, "all_runs": runs}
        if 1 in by and 16 in by and by[1] > 0:
            summary["throughput_16_over_1"] = by[16] / by[1]
            print(f"throughput at 16 clients / 1 client{f' ({protocols[0]})' if show_protocol else ''}: "
                  f"{by[16] / by[1]:.1f}x")
        if args.protocol == "both":
            summary["http_vs_grpc"] = compare(best, levels)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
