"""Prefill and decode tokens/s: sc2deploy's ONNX Runtime runtime vs its eager runtime vs transformers' generate.

All three run the same weights (the `bench` preset, ~111M parameters, random, written once as a
Hugging Face checkpoint and exported to an ort artifact), greedy, at batch 1 and batch 8, in one
process with the same thread count. The decode ceiling is measured in the same run: tokens/s
<= memory bandwidth / bytes of weights read per decode step (times the batch, since a step
reads the weights once for all rows). The hand-built ORT session of docs/machines.md (65.9 / 284 tok/s) is
shown as an anchor, and the same artifact through a plain session.run() (numpy feeds, no
IOBinding) as a same-run baseline.
Not a test: run it by hand, e.g.
    python bench/decode.py [--prompt 128] [--new 64] [--threads 2] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HANDBUILT_ORT = {1: 65.9, 8: 284.0}  # docs/machines.md#the-decode-anchors: plain ORT session on a hand-built GQA graph, decode tok/s


def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of `repeats` sums over a `gib` GiB float32 tensor (all threads)."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def prompts_for(batch: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch)
    return [torch.randint(1, vocab, (length,), generator=gen).tolist() for _ in range(batch)]


def time_runtime(runtime, prompts: list[list[int]], new: int, all_logits: bool = False) -> dict:
    """One prefill (of the whole batch) and `new` decode steps through the Runtime interface."""
    slots = list(range(len(prompts)))
    start = time.perf_counter()
    if len(prompts) == 1:
        logits = runtime.prefill(0, prompts[0], all_logits=all_logits)
        logits = [logits[-1] if all_logits else logits]
    else:
        logits = [row[-1] for row in runtime.prefill_batch(prompts)]
    prefill = time.perf_counter() - start
    tokens = [int(row.argmax()) for row in logits]
    start = time.perf_counter()
    for _ in range(new):
        tokens = runtime.decode(slots, tokens).argmax(dim=-1).tolist()
    decode = time.perf_counter() - start
    batch, length = len(prompts), len(prompts[0])
    return {"prefill_tok_s": batch * length / prefill, "decode_tok_s": batch * new / decode}


class PlainSession:
    """The same artifact through session.run() with numpy feeds: no IOBinding, presents copied out each step."""

    def __init__(self, artifact: Path, config, capacity: int, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(artifact / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]
        self.config, self.capacity = config, capacity

    def time(self, prompts: list[list[int]], new: int) -> dict:
        import numpy as np

        c = self.config
        batch, length = len(prompts), len(prompts[0])
        shape = (batch, c.num_key_value_heads, self.capacity, c.head_dim)
        feed = {f"past_key_values.{i}.{k}": np.zeros(shape, np.float32)
                for i in range(c.num_hidden_layers) for k in ("key", "value")}
        ids = np.asarray(prompts, dtype=np.int64)
        start = time.perf_counter()
        outputs = self.session.run(self.names, {**feed, "input_ids": ids, "attention_mask": np.ones_like(ids)})
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for step in range(new):
            feed = {n.replace("present", "past_key_values"): v for n, v in zip(self.names[1:], outputs[1:])}
            tokens = outputs[0][:, -1].argmax(-1)[:, None].astype(np.int64)
            mask = np.ones((batch, length + step + 1), np.int64)
            outputs = self.session.run(self.names, {**feed, "input_ids": tokens, "attention_mask": mask})
        decode = time.perf_counter() - start
        return {"prefill_tok_s": batch * length / prefill, "decode_tok_s": batch * new / decode}


def time_transformers(model, prompts: list[list[int]], new: int) -> dict:
    """transformers' own loop: prefill = one forward; decode = generate(new + 1 tokens) - generate(1 token)."""
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def generate(n: int) -> float:
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                             eos_token_id=None, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - start

    with torch.inference_mode():
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        prefill = time.perf_counter() - start
        one = generate(1)
        every = generate(new + 1)
    batch, length = ids.shape
    return {"prefill_tok_s": batch * length / prefill, "decode_tok_s": batch * new / max(every - one, 1e-9)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="bench")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence (default 128)")
    parser.add_argument("--new", type=int, default=64, help="decode steps timed (default 64)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where the checkpoint and artifact go (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from transformers import Starcoder2ForCausalLM

    from sc2deploy.checkpoint import CheckpointSource, RandomSource, write_checkpoint
    from sc2deploy.config import preset
    from sc2deploy.export import export_artifact
    from sc2deploy.runtime.eager import EagerRuntime
    from sc2deploy.runtime.onnxruntime import OrtRuntime

    torch.set_num_threads(args.threads)
    config = preset(args.size)
    # A decode step reads every weight once, except an untied embedding table (a gather of B rows).
    step_bytes = config.weight_bytes("fp32")
    if not config.tie_word_embeddings:
        step_bytes -= config.vocab_size * config.hidden_size * 4
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="sc2-decode-bench-", dir=args.dir) as tmp:
        tmp = Path(tmp)
        log("writing the checkpoint and exporting it ...")
        write_checkpoint(RandomSource(config), tmp / "checkpoint", "fp32")
        export_artifact(CheckpointSource(tmp / "checkpoint"), tmp / "artifact", "fp32", "ort")
        max_batch = max(args.batches)
        capacity = args.prompt + args.new + 1
        ort_runtime = OrtRuntime(tmp / "artifact", max_batch=max_batch, capacity=capacity, threads=args.threads)
        eager = EagerRuntime(CheckpointSource(tmp / "checkpoint"), max_batch=max_batch, capacity=capacity,
                             threads=args.threads)
        plain = PlainSession(tmp / "artifact", config, ort_runtime.capacity, args.threads)
        hf = Starcoder2ForCausalLM.from_pretrained(tmp / "checkpoint", dtype=torch.float32).eval()
        measures = []
        for batch in args.batches:
            prompts = prompts_for(batch, args.prompt, config.vocab_size)
            measures += [
                ("ort", batch, lambda p=prompts: time_runtime(ort_runtime, p, args.new)),
                ("ort-plain-run", batch, lambda p=prompts: plain.time(p, args.new)),
                ("eager", batch, lambda p=prompts: time_runtime(eager, p, args.new)),
                ("transformers", batch, lambda p=prompts: time_transformers(hf, p, args.new)),
            ]
        one = prompts_for(1, args.prompt, config.vocab_size)
        measures.append(("ort-all-logits", 1, lambda: time_runtime(ort_runtime, one, 1, all_logits=True)))
        # Repeats interleave the runtimes, so a burst of load on the machine hits all of them; best of each.
        results: dict[str, dict[int, dict]] = {}
        bandwidth, loads = 0.0, [os.getloadavg()]
        for repeat in range(args.repeats):
            log(f"repeat {repeat + 1}/{args.repeats} ...")
            torch.set_num_threads(args.threads)
            bandwidth = max(bandwidth, measure_bandwidth())
            for name, batch, measure in measures:
                # What each deployment does: the ORT runtime keeps torch (used only on logits) on one thread.
                torch.set_num_threads(1 if name.startswith("ort") else args.threads)
                got = measure()
                best = results.setdefault(name, {}).setdefault(batch, got)
                for key, value in got.items():
                    best[key] = max(best[key], value)
            loads.append(os.getloadavg())
        prefill_all_logits = results.pop("ort-all-logits")[1]["prefill_tok_s"]

    ceiling = {b: b * bandwidth / step_bytes for b in args.batches}
    report = {
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "load_avg_1min": [x[0] for x in loads]},
        "model": {"size": args.size, "parameters": config.num_parameters, "bytes_per_decode_step": step_bytes},
        "prompt_tokens": args.prompt, "decode_steps": args.new,
        "bandwidth_gb_s": bandwidth / 1e9, "ceiling_decode_tok_s": ceiling,
        "results": results, "ort_prefill_all_logits_tok_s_batch1": prefill_all_logits,
        "handbuilt_ort_decode_tok_s": HANDBUILT_ORT,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"model {args.size}: {config.num_parameters / 1e6:.0f}M parameters, {step_bytes / 1e9:.3f} GB read per decode "
          f"step; bandwidth {bandwidth / 1e9:.1f} GB/s; {args.threads} threads; "
          f"load avg {min(x[0] for x in loads):.1f}-{max(x[0] for x in loads):.1f}")
    print(f"prompt {args.prompt} tokens, {args.new} decode steps, best of {args.repeats}")
    print(f"{'batch':<6}{'runtime':<15}{'prefill tok/s':>14}{'decode tok/s':>14}{'decode / ceiling':>18}"
          f"{'ort speedup':>13}")
    for batch in args.batches:
        ort_decode = results["ort"][batch]["decode_tok_s"]
        for name in ("ort", "ort-plain-run", "eager", "transformers"):
            r = results[name][batch]
            speedup = ort_decode / r["decode_tok_s"]
            print(f"{batch:<6}{name:<15}{r['prefill_tok_s']:>14.1f}{r['decode_tok_s']:>14.1f}"
                  f"{r['decode_tok_s'] / ceiling[batch]:>18.2f}{speedup:>12.2f}x")
        if batch in HANDBUILT_ORT:
            print(f"{batch:<6}{'anchor':<15}{'':>14}{HANDBUILT_ORT[batch]:>14.1f}"
                  f"{HANDBUILT_ORT[batch] / ceiling[batch]:>18.2f}{ort_decode / HANDBUILT_ORT[batch]:>12.2f}x")
        print(f"{batch:<6}{'ceiling':<15}{'':>14}{ceiling[batch]:>14.1f}")
    print(f"ort prefill with every position's logits (batch 1): {prefill_all_logits:.1f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
