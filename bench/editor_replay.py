"""Editor replay: the time to first token of fill-in-the-middle requests as an editor sends them while its user
types, with the server's prefix cache on and off.

A deterministic synthetic Python file of about --file-tokens tokens (2,000 by default) is edited at a cursor
placed at a fraction of the file (--cursor: the share of the file before it, snapped to the start of a line;
1.0 is before the final newline, as a FIM request needs a non-empty suffix): each step types 1-4 characters
at the cursor, or (one step in five) deletes the one before it, and sends the FIM request
`<fim_prefix>BEFORE<fim_suffix>AFTER<fim_middle>` (greedy, --max-tokens). Two servers run side by side,
started once each with the same backend and weights: prefix cache on (--prefix-cache-mb 512) and off (0).
Each step sends the same request to both, one after the other (never at once), alternating which goes first.
Reported per cursor: TTFT p50/p99 of each (request sent -> first chunk with tokens, over the --steps edited
requests; the first, unedited request of each cursor is sent but not counted), the ratio cached / cold of
the p50s, whether every completion was the same token for token on both servers (a mismatch is printed
loudly and makes the exit status 1), and the prefix cache's lookups, hits and reused tokens (from the cached
server's Prometheus metrics, over the counted steps) against the prompt tokens each server prefilled.

Prefix-suffix-middle order puts the suffix after the edit point, so an edit keeps the cache of the text
before the cursor only: near the end of the file (--cursor 1.0) almost the whole prompt is reused, at 0.5
about half of it must be prefilled again.

    python bench/editor_replay.py                            # ort, cursors 1.0, 0.9, 0.5, 50 steps each (~6 min)
    python bench/editor_replay.py --backend eager --cursor 1.0 --steps 30
    python bench/editor_replay.py --cursor 1.0,0.5 --file-tokens 3000 --json replay.json
Progress goes to stderr, the table to stdout. Not a test: numbers depend on the machine and on its load.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from serve_load import ensure_artifact, percentile, start_server  # noqa: E402

from sc2deploy.serving.client import Client, make_request  # noqa: E402
from sc2deploy.tokenizer import Tokenizer  # noqa: E402

METRICS = ("sc2deploy_prefix_cache_lookups_total", "sc2deploy_prefix_cache_hits_total",
           "sc2deploy_prefix_cache_reused_tokens_total", "sc2deploy_prompt_tokens_total")
TYPED = ["    total = total + value * 2\n", "    if value is None:\n        return default\n",
         "    result.append(compute(item, key=key))\n", "    cache[key] = (index, len(items))\n",
         "    for name, entry in sorted(table.items()):\n", "    print(f'{name}: {entry!r}')\n"]


@dataclass
class Server:
    client: Client
    metrics_port: int


def source_file(tokenizer: Tokenizer, tokens: int, seed: int = 0) -> str:
    """A deterministic Python file of about `tokens` tokens (whole functions), ending with a newline."""
    rng = random.Random(seed)
    words = ["value", "index", "item", "result", "total", "cache", "key", "entry", "count", "limit", "table", "name"]
    parts, n = ['"""Synthetic module for the editor replay benchmark."""\nimport os\nimport sys\n\n'], 0
    while len(tokenizer.encode("".join(parts))) < tokens:
        a, b, c = rng.sample(words, 3)
        parts.append(f"\ndef {a}_{b}_{n}({a}, {b}={rng.randint(0, 99)}):\n"
                     f"    \"\"\"Return the {c} of {a} and {b}.\"\"\"\n"
                     f"    {c} = [{a} * {rng.randint(2, 9)} for {a} in range({b})]\n"
                     f"    if len({c}) > {rng.randint(10, 500)}:\n"
                     f"        {c} = {c}[:{rng.randint(1, 9)}]\n"
                     f"    return sum({c}) + {a} // {rng.randint(2, 7)}\n\n")
        n += 1
    return "".join(parts)


def edits(text: str, cursor: int, steps: int, seed: int):
    """(before, after) of the cursor at each step: first the file as is, then `steps` edits typing TYPED at the
    cursor, 1-4 characters at a time, or (one step in five) deleting the character before the cursor."""
    rng = random.Random(seed)
    before, after = text[:cursor], text[cursor:]
    typed = "".join(TYPED * (1 + steps * 4 // len("".join(TYPED))))
    yield before, after
    for _ in range(steps):
        if rng.random() < 0.2 and before:
            before = before[:-1]
        else:
            k = rng.randint(1, 4)
            before, typed = before + typed[:k], typed[k:]
        yield before, after


def scrape(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    found = {}
    for name in METRICS:
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        found[name] = float(match.group(1)) if match else float("nan")
    return found


def complete(client: Client, before: str, after: str, max_tokens: int) -> tuple[float, list[int], int]:
    """(TTFT in s, generated token ids, prompt tokens) of one streamed FIM request."""
    sent, ttft, ids, prompt_tokens = time.monotonic(), None, [], 0
    for chunk in client.stream(make_request(before, after, max_tokens=max_tokens), timeout=300):
        if chunk.token_ids:
            if ttft is None:
                ttft = time.monotonic() - sent
            ids.extend(chunk.token_ids)
        if chunk.usage.prompt_tokens:
            prompt_tokens = chunk.usage.prompt_tokens
    return (time.monotonic() - sent if ttft is None else ttft), ids, prompt_tokens


def replay(servers: dict[str, Server], tokenizer: Tokenizer, text: str, fraction: float, args, log) -> dict:
    """One cursor position: the same requests to both servers, alternating which goes first."""
    cut = text.rfind("\n", 0, max(1, int(fraction * len(text)))) + 1  # the start of the line the fraction is on
    if cut >= len(text) - 1:
        cut = text.rfind("\n", 0, len(text) - 1) + 1  # at the end: the start of the last line (a suffix remains)
    ttft: dict[str, list[float]] = {name: [] for name in servers}
    mismatches, prompt_tokens, before_metrics = [], [], {}
    for step, (before, after) in enumerate(edits(text, cut, args.steps, args.seed)):
        if step == 1:  # the counted steps start: the first request (nothing to reuse yet) is left out
            before_metrics = {name: scrape(s.metrics_port) for name, s in servers.items()}
        order = list(servers) if step % 2 == 0 else list(servers)[::-1]
        outputs = {}
        for name in order:
            seconds, ids, prompt = complete(servers[name].client, before, after, args.max_tokens)
            outputs[name] = ids
            if step:
                ttft[name].append(seconds)
        prompt_tokens.append(prompt)
        if outputs["cached"] != outputs["cold"]:
            mismatches.append({"step": step, "cached": outputs["cached"], "cold": outputs["cold"]})
            print(f"MISMATCH at cursor {fraction:g} step {step}: cached {outputs['cached']} != cold "
                  f"{outputs['cold']}", flush=True)
        if step:
            log(f"cursor {fraction:g} step {step}/{args.steps}: cached {1e3 * ttft['cached'][-1]:.0f} ms, "
                f"cold {1e3 * ttft['cold'][-1]:.0f} ms, {prompt} prompt tokens, load {os.getloadavg()[0]:.1f}")
    after_metrics = {name: scrape(s.metrics_port) for name, s in servers.items()}
    delta = {name: {k: after_metrics[name][k] - before_metrics[name][k] for k in METRICS} for name in servers}
    c = delta["cached"]
    counted_prompt = sum(prompt_tokens[1:])
    result = {"cursor": fraction, "cursor_char": cut, "chars": len(text), "steps": args.steps,
              "prompt_tokens_p50": percentile([float(n) for n in prompt_tokens], 50),
              "tokens_before_cursor": len(tokenizer.encode(text[:cut])),
              "mismatches": mismatches, "identical": not mismatches,
              "lookups": c[METRICS[0]], "hits": c[METRICS[1]], "reused_tokens": c[METRICS[2]],
              "prefilled_tokens_cached": c[METRICS[3]], "prefilled_tokens_cold": delta["cold"][METRICS[3]],
              "prompt_tokens_sent": counted_prompt}
    result["hit_rate"] = result["hits"] / result["lookups"] if result["lookups"] else float("nan")
    result["reused_share"] = result["reused_tokens"] / counted_prompt if counted_prompt else float("nan")
    for name in servers:
        result[f"{name}_ttft_p50_ms"] = 1e3 * percentile(ttft[name], 50)
        result[f"{name}_ttft_p99_ms"] = 1e3 * percentile(ttft[name], 99)
    result["ratio_p50"] = result["cached_ttft_p50_ms"] / result["cold_ttft_p50_ms"]
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="ort", choices=("ort", "eager"), help="runtime of both servers (default ort)")
    p.add_argument("--size", default="bench", help="model preset (default bench, ~111M parameters)")
    p.add_argument("--artifact", type=Path, help="ort export to serve (default: a cached export under /tmp, made "
                                                 "once when missing)")
    p.add_argument("--cursor", default="1.0,0.9,0.5",
                   help="cursor positions, as the share of the file before the cursor (default 1.0,0.9,0.5)")
    p.add_argument("--steps", type=int, default=50, help="edited requests per cursor position (default 50)")
    p.add_argument("--file-tokens", type=int, default=2000, help="size of the synthetic file (default 2000)")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request (default 16)")
    p.add_argument("--prefix-cache-mb", type=int, default=512, help="prefix cache of the cached server (default 512)")
    p.add_argument("--prefill-tokens", type=int, default=256, help="server --prefill-tokens (default 256)")
    p.add_argument("--context", type=int, default=4096, help="server --context (default 4096)")
    p.add_argument("--threads", type=int, help="server runtime threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the file and of the typing (default 0)")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = p.parse_args()
    args.artifact = args.artifact or Path(f"/tmp/sc2deploy-bench/{args.size}-ort-fp32")
    if args.backend == "ort" and not ensure_artifact(args):
        raise SystemExit("the ort backend needs onnxruntime and an export (sc2deploy export --target ort)")
    args.max_batch, args.protocol, args.dtype = 2, "grpc", "fp32"  # what serve_load.start_server reads
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731

    tokenizer = Tokenizer.load()
    text = source_file(tokenizer, args.file_tokens, args.seed)
    if len(tokenizer.encode(text)) + 4 * args.steps + args.max_tokens + 8 > args.context:
        raise SystemExit(f"a {args.file_tokens}-token file and its edits do not fit --context {args.context}; the "
                         "server would trim the prompt's start, and no prefix would be shared: raise --context")
    cursors = [float(x) for x in args.cursor.split(",")]
    servers: dict[str, Server] = {}
    processes = []
    try:
        for name, mb in (("cached", args.prefix_cache_mb), ("cold", 0)):
            process, port, _, metrics_port = start_server(args, ("--prefix-cache-mb", str(mb), "--metrics-port", "0"))
            processes.append(process)
            servers[name] = Server(Client(f"127.0.0.1:{port}"), metrics_port or 0)
            servers[name].client.wait_ready(120)
        info = servers["cached"].client.info()
        print(f"servers: {info.size} {info.dtype} on {info.runtime}, prefix cache {args.prefix_cache_mb} MiB vs off, "
              f"--prefill-tokens {args.prefill_tokens}; file of {len(tokenizer.encode(text))} tokens "
              f"({len(text)} chars); {args.steps} edits per cursor, max_tokens {args.max_tokens}; "
              f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", flush=True)
        results = []
        for fraction in cursors:
            load = os.getloadavg()[0]
            r = replay(servers, tokenizer, text, fraction, args, log)
            r["loadavg_before"], r["loadavg_after"] = round(load, 2), round(os.getloadavg()[0], 2)
            results.append(r)
        print(f"{'cursor':>6} {'before':>6} {'prompt':>6} {'cached TTFT p50/p99':>20} {'cold TTFT p50/p99':>19} "
              f"{'cached/cold p50':>15} {'hits':>7} {'reused':>7} {'prefilled cached/cold':>22} {'identical':>9} "
              f"{'load':>9}")
        for r in results:
            print(f"{r['cursor']:>6g} {r['tokens_before_cursor']:>6} {r['prompt_tokens_p50']:>6.0f} "
                  f"{r['cached_ttft_p50_ms']:>9.1f} / {r['cached_ttft_p99_ms']:>5.0f}ms "
                  f"{r['cold_ttft_p50_ms']:>8.1f} / {r['cold_ttft_p99_ms']:>5.0f}ms {r['ratio_p50']:>15.3f} "
                  f"{r['hits']:>3.0f}/{r['lookups']:<3.0f} {r['reused_share']:>7.1%} "
                  f"{r['prefilled_tokens_cached']:>10.0f} / {r['prefilled_tokens_cold']:<9.0f} "
                  f"{'yes' if r['identical'] else 'NO':>9} {r['loadavg_before']:>4.1f}-{r['loadavg_after']:<4.1f}")
        mismatched = sum(len(r["mismatches"]) for r in results)
        if mismatched:
            print(f"MISMATCH: {mismatched} requests completed differently with the prefix cache on and off",
                  flush=True)
        if args.json:
            summary = {"backend": info.runtime, "size": info.size, "dtype": info.dtype, "cpus": os.cpu_count(),
                       "file_tokens": len(tokenizer.encode(text)), "file_chars": len(text), "steps": args.steps,
                       "max_tokens": args.max_tokens, "prefix_cache_mb": args.prefix_cache_mb,
                       "prefill_tokens": args.prefill_tokens, "results": results}
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
        return 1 if mismatched else 0
    finally:
        for server in servers.values():
            server.client.close()
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
