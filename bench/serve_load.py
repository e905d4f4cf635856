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
    python bench/serve_load.py --backend ort --levels 16 --max-tokens-range 8,128   # mixed lengths: ITL p99/p50
    python bench/serve_load.py --backend ort --levels 1,16 --raw-batch 16   # 16 clients vs the runtime's own decode
    python bench/serve_load.py --backend ort --long-prompt 4000 --max-batch 16   # 8 streams, idle vs a long prefill

--max-tokens-range LO,HI gives each request a max_tokens drawn uniformly from [LO, HI] (seeded per client), so
sequences join and leave the batch at different steps; each level then also reports inter-token p99 / p50.
--raw-batch N (ort) times the runtime alone on the same artifact in this process (OrtRuntime, N rows of
~50-token prompts, 64 greedy decode steps, the server idle meanwhile), once per repeat, and reports the served
tokens/s at N clients as a share of it. --long-prompt TOKENS runs --long-streams streams (default 8) for
--duration while another client sends a TOKENS-token prompt (max_tokens 1, a different one each time) every
--long-every seconds; the streams' inter-token gaps that overlap a long prompt's prefill (sent -> its token)
are compared with those 0.5 s or more away from any (idle). --context is raised to fit the prompt.
Not a test: numbers depend on the machine and on whatever else runs on it.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import re
import signal
import statistics
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


def start_server(args, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int, int | None, int | None]:
    """The server process, its gRPC port, its HTTP port (None unless --protocol needs HTTP) and its metrics port
    (None unless `extra` asks for one); `extra`: more `serve` options."""
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
    command += list(extra)
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
            metrics = re.search(r"metrics on :(\d+)", line)
            return (process, int(match.group(1)), int(http.group(1)) if http else None,
                    int(metrics.group(1)) if metrics else None)
    raise SystemExit(f"the server exited with {process.wait()} before listening")


class GrpcStreams:
    """One client's gRPC channel. tokens(text) streams a completion as (tokens, arrival) pairs: `tokens`
    generated tokens just received, `arrival` False only for a late count of tokens received before;
    closing the generator cancels the call."""

    def __init__(self, endpoints: dict):
        self.client = Client(endpoints["grpc"])

    def tokens(self, text: str, max_tokens: int):
        stream = self.client.stream(make_request(text, max_tokens=max_tokens), timeout=300)
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

    def __init__(self, endpoints: dict):
        self.client = httpx.Client(base_url=endpoints["http"], timeout=300)
        self.model = endpoints["model"]

    def tokens(self, text: str, max_tokens: int):
        body = {"model": self.model, "prompt": text, "max_tokens": max_tokens, "temperature": 0,
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


def run_level(protocol: str, endpoints: dict, clients: int, duration: float, warmup: float, args,
              side=None, spans: dict | None = None) -> dict:
    """`clients` streaming clients for warmup + duration seconds. `side(start, end)` runs in one more thread
    meanwhile; `spans` collects the (from, to) times of each inter-token gap in the window ("itl") and of each
    request's wait for its first token ("ttft")."""
    start = time.monotonic() + warmup
    end = start + duration
    lock = threading.Lock()
    tokens_in_window, ttft, itl, requests_done = [0], [], [], [0]

    def client_loop(client_id: int) -> None:
        streams = STREAMS[protocol](endpoints)
        rng = random.Random(1000 * args.seed + client_id)
        n = 0
        while time.monotonic() < end:
            text = prompt(client_id, n, args.prompt_chars)
            n += 1
            sent = last = time.monotonic()
            first = True
            local_itl, local_gaps, local_tokens, local_first = [], [], 0, None
            max_tokens = rng.randint(*args.max_tokens_range) if args.max_tokens_range else args.max_tokens
            with contextlib.closing(streams.tokens(text, max_tokens)) as stream:  # closing it cancels the request
                for count, arrival in stream:
                    now = time.monotonic()
                    if arrival:
                        if first:
                            if now <= end:  # every request answered in time, the first wave's included
                                ttft.append(now - sent)
                                local_first = (sent, now)
                            first = False
                        elif start <= now <= end:
                            local_itl.append(now - last)
                            local_gaps.append((last, now))
                        last = now
                    if start <= now <= end:
                        local_tokens += count
                    if now > end:
                        break
            with lock:
                tokens_in_window[0] += local_tokens
                itl.extend(local_itl)
                if spans is not None:
                    spans["itl"].extend(local_gaps)
                    spans["ttft"] += [local_first] if local_first else []
                requests_done[0] += 1
        streams.close()

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    if side is not None:
        threads.append(threading.Thread(target=side, args=(start, end)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"protocol": protocol, "clients": clients, "tokens_per_s": tokens_in_window[0] / duration,
            "requests": requests_done[0],
            "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
            "itl_p50_ms": 1e3 * percentile(itl, 50), "itl_p99_ms": 1e3 * percentile(itl, 99),
            "itl_p99_over_p50": percentile(itl, 99) / percentile(itl, 50) if itl else float("nan"),
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


def long_prompt_texts(tokens: int):
    """text(): a prompt of about `tokens` tokens, each call's differing from the others' in its first tokens (so
    the prefix cache cannot serve one from another)."""
    from sc2deploy.tokenizer import Tokenizer

    tokenizer = Tokenizer.load()
    body = "".join(f"value_{i} = compute({i}, {i * 7 % 13}, '{SNIPPETS[i % 4][:12]}')\n" for i in range(tokens))
    ids = tokenizer.encode(body)[:max(1, tokens - 12)]
    body = tokenizer.decode(ids)
    calls = itertools.count()

    def text() -> str:
        n = next(calls)
        return f"# long prompt {n}: {n * 7919 % 10007} {n}\n" + body
    return text


IDLE_MARGIN = 0.5  # s: a span this close to a long prefill counts neither as idle nor as during one


def split(spans: list, windows: list) -> tuple[list[float], list[float]]:
    """Durations of the (from, to) spans that overlap a window, and of those IDLE_MARGIN or more from every one."""
    during = [b - a for a, b in spans if any(a < d and b > s for s, d in windows)]
    idle = [b - a for a, b in spans if all(b < s - IDLE_MARGIN or a > d + IDLE_MARGIN for s, d in windows)]
    return during, idle


def long_prompt_run(endpoints: dict, args, texts) -> dict:
    """--long-streams streams for warmup + duration while another client sends a long prompt every --long-every
    s: the streams' inter-token gaps and times to first token that overlap a long prefill (sent -> its token),
    against those at least IDLE_MARGIN s away from every one."""
    windows: list[tuple[float, float]] = []
    prompt_tokens: list[int] = []
    spans: dict[str, list[tuple[float, float]]] = {"itl": [], "ttft": []}

    def side(start: float, end: float) -> None:
        with Client(endpoints["grpc"]) as client:
            time.sleep(max(0.0, start - time.monotonic()))
            while time.monotonic() + args.long_every < end:
                time.sleep(args.long_every)
                sent, done = time.monotonic(), None
                for chunk in client.stream(make_request(texts(), max_tokens=1), timeout=300):
                    if chunk.token_ids and done is None:
                        done = time.monotonic()
                    if chunk.usage.prompt_tokens:
                        prompt_tokens.append(chunk.usage.prompt_tokens)
                windows.append((sent, done or time.monotonic()))

    r = run_level("grpc", endpoints, args.long_streams, args.duration, args.warmup, args, side=side, spans=spans)
    r.update(long_prompts=len(windows), long_prompt_tokens=prompt_tokens,
             long_prefill_s_p50=percentile([d - s for s, d in windows], 50))
    for key in ("itl", "ttft"):
        during, idle = split(spans[key], windows)
        r.update({f"idle_{key}_p50_ms": 1e3 * percentile(idle, 50), f"idle_{key}_p99_ms": 1e3 * percentile(idle, 99),
                  f"during_{key}_p50_ms": 1e3 * percentile(during, 50),
                  f"during_{key}_p99_ms": 1e3 * percentile(during, 99),
                  f"{key}_samples_idle_during": [len(idle), len(during)]})
    r["during_p99_over_idle_p99"] = r["during_itl_p99_ms"] / r["idle_itl_p99_ms"]
    return r


def raw_decode(args, batch: int, steps: int = 64, prompt_tokens: int = 50) -> float:
    """Decode tokens/s of the runtime alone (OrtRuntime on --artifact, in this process, --threads): `batch` rows of
    `prompt_tokens`-token prompts prefilled together, then `steps` greedy decode steps timed (bench/decode.py)."""
    from decode import prompts_for, time_runtime

    from sc2deploy.runtime.onnxruntime import OrtRuntime

    key = (args.artifact, batch, prompt_tokens + steps + 1, args.threads)
    if key not in _RAW_RUNTIMES:  # opened once, at the first repeat
        _RAW_RUNTIMES[key] = OrtRuntime(args.artifact, max_batch=batch, capacity=key[2], threads=args.threads)
    runtime = _RAW_RUNTIMES[key]
    return time_runtime(runtime, prompts_for(batch, prompt_tokens, runtime.config.vocab_size), steps)["decode_tok_s"]


_RAW_RUNTIMES: dict = {}


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


def long_prompt_main(endpoints: dict, args) -> int:
    texts = long_prompt_texts(args.long_prompt)
    print(f"{args.long_streams} streams; a {args.long_prompt}-token prompt every {args.long_every:g} s "
          f"(--prefill-tokens {args.prefill_tokens})")
    print(f"{'run':>3} {'idle ITL p50/p99':>17} {'during ITL p50/p99':>19} {'during/idle p99':>15} "
          f"{'prefill s':>9} {'long':>4} {'samples idle/during':>19} {'TTFT p50 idle/during':>20} {'load':>5}")
    runs = []
    for repeat in range(args.repeat):
        load = os.getloadavg()[0]
        r = long_prompt_run(endpoints, args, texts)
        r["loadavg_before"] = round(load, 2)
        runs.append(r)
        idle, during = r["itl_samples_idle_during"]
        print(f"{repeat + 1:>3} {r['idle_itl_p50_ms']:>7.0f} / {r['idle_itl_p99_ms']:>4.0f}ms "
              f"{r['during_itl_p50_ms']:>8.0f} / {r['during_itl_p99_ms']:>4.0f}ms "
              f"{r['during_p99_over_idle_p99']:>14.2f}x {r['long_prefill_s_p50']:>9.2f} {r['long_prompts']:>4} "
              f"{idle:>9}/{during:<9} {r['idle_ttft_p50_ms']:>9.0f} / {r['during_ttft_p50_ms']:>6.0f}ms {load:>5.1f}",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps({"mode": "long_prompt", "long_prompt": args.long_prompt,
                                         "long_streams": args.long_streams, "prefill_tokens": args.prefill_tokens,
                                         "cpus": os.cpu_count(), "runs": runs}, indent=2) + "\n")
    return 0


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
    p.add_argument("--max-tokens-range", metavar="LO,HI",
                   help="each request's max_tokens drawn uniformly from [LO, HI] (seeded per client), instead of "
                        "--max-tokens; each level also reports inter-token p99 / p50")
    p.add_argument("--seed", type=int, default=0, help="seed of --max-tokens-range (default 0)")
    p.add_argument("--raw-batch", type=int, default=0, metavar="N",
                   help="ort: also time the runtime's own decode at batch N (64 steps) once per repeat, and report "
                        "the served tokens/s at N clients as a share of it")
    p.add_argument("--long-prompt", type=int, default=0, metavar="TOKENS",
                   help="instead of --levels: --long-streams streams, their inter-token gaps while idle against "
                        "while a TOKENS-token prompt is prefilled for another client")
    p.add_argument("--long-streams", type=int, default=8, help="streams of --long-prompt (default 8)")
    p.add_argument("--long-every", type=float, default=3.0,
                   help="--long-prompt: seconds between one long prompt's token and the next one's sending (default 3)")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = p.parse_args()
    args.max_tokens_range = tuple(int(x) for x in args.max_tokens_range.split(",")) if args.max_tokens_range else None
    if args.long_prompt:
        args.protocol, args.context = "grpc", max(args.context, args.long_prompt + 128)
    args.artifact = args.artifact or Path(f"/tmp/sc2deploy-bench/{args.size}-ort-fp32")
    if args.backend == "auto":
        args.backend = "ort" if ensure_artifact(args) else "eager"
    elif args.backend == "ort" and not ensure_artifact(args):
        raise SystemExit("the ort backend needs onnxruntime and an export (sc2deploy export --target ort)")
    if args.raw_batch and args.backend != "ort":
        raise SystemExit("--raw-batch times the ort runtime on --artifact; use --backend ort")

    protocols = ("grpc", "http") if args.protocol == "both" else (args.protocol,)
    if args.server and args.protocol != "grpc" and not args.http_server:
        raise SystemExit("--server with --protocol http or both needs --http-server HOST:PORT")

    process = None
    if args.server:
        target, http_target = args.server, args.http_server
    else:
        process, port, http_port, _ = start_server(args)
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
        tokens = "%d-%d" % args.max_tokens_range if args.max_tokens_range else args.max_tokens
        print(f"server: {info.size} {info.dtype} on {info.runtime}, max batch {info.max_batch}, "
              f"{os.cpu_count()} CPUs; {tokens} tokens per request, {args.duration:g} s per level")
        if args.long_prompt:
            return long_prompt_main(endpoints, args)
        show_protocol = args.protocol != "grpc"
        header = ((f"{'protocol':>8} " if show_protocol else "") +
                  f"{'clients':>7} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} "
                  f"{'requests':>8}")
        levels = [int(x) for x in args.levels.split(",")]
        runs: dict[int, list[dict]] = {n: [] for n in levels}  # every run, in the order run
        print(header)
        raw: list[float] = []
        for repeat in range(args.repeat):  # levels (and protocols) interleaved: outside load hits one run of each
            for clients in levels:
                for protocol in protocols:
                    load = os.getloadavg()[0]
                    r = run_level(protocol, endpoints, clients, args.duration, args.warmup, args)
                    r["loadavg_before"] = round(load, 2)
                    runs[clients].append(r)
                    note = f"   (run {repeat + 1}, load {load:.1f})" if args.repeat > 1 else f"   (load {load:.1f})"
                    if args.max_tokens_range:
                        note = f"   ITL p99/p50 {r['itl_p99_over_p50']:.1f}" + note
                    print(row(r, show_protocol) + note, flush=True)
            if args.raw_batch:
                load = os.getloadavg()[0]
                raw.append(raw_decode(args, args.raw_batch))
                print(f"runtime alone, batch {args.raw_batch}: {raw[-1]:.1f} tokens/s   (load {load:.1f})", flush=True)
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
        # Per repeat, the runs next to each other in time, so a burst of outside load hits both sides of a ratio.
        paired = {n: [r["tokens_per_s"] for r in runs[n] if r["protocol"] == protocols[0]] for n in levels}
        if 1 in by and 16 in by and by[1] > 0:
            each = [b / a for a, b in zip(paired[1], paired[16]) if a > 0]
            summary.update(throughput_16_over_1=by[16] / by[1], throughput_16_over_1_per_repeat=each)
            print(f"throughput at 16 clients / 1 client{f' ({protocols[0]})' if show_protocol else ''}: "
                  f"{by[16] / by[1]:.1f}x (best of each); per repeat {', '.join(f'{x:.1f}x' for x in each)}, "
                  f"median {statistics.median(each):.1f}x")
        if raw and args.raw_batch in by:
            each = [served / alone for served, alone in zip(paired[args.raw_batch], raw)]
            summary.update(raw_decode_tokens_per_s=raw, raw_batch=args.raw_batch,
                           served_over_raw=by[args.raw_batch] / max(raw), served_over_raw_per_repeat=each)
            print(f"served at {args.raw_batch} clients / the runtime's decode at batch {args.raw_batch}: "
                  f"{by[args.raw_batch]:.1f} / {max(raw):.1f} = {by[args.raw_batch] / max(raw):.1%} (best of each); "
                  f"per repeat {', '.join(f'{x:.0%}' for x in each)}, median {statistics.median(each):.0%}")
        if args.max_tokens_range:
            summary["max_tokens_range"] = args.max_tokens_range
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
