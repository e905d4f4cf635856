"""Quantized decode on CPU: sc2deploy's ORT artifacts (fp32, int8, int4) against llama.cpp (f16, q8_0, q4_0, q4_K_M)
and transformers (fp32), on the same weights, in one run.

One random `bench` checkpoint (~111M parameters, StarCoder2's shape, tied head) is exported by sc2deploy unquantized
and with SCHEMES["int8"] / SCHEMES["int4"] (MatMulNBits + GatherBlockQuantized), and converted by llama.cpp's
convert_hf_to_gguf.py to f16, then llama-quantize'd to q8_0, q4_0 and q4_K_M (build the tools with
scripts/build-llama-cpp.sh). Then, with the same thread count for all, repeats interleave every contender (a burst
of load on the machine hits all of them) and each figure is reported as best and median over the repeats:
  prefill tok/s of a 128- and a 512-token prompt (batch 1, from an empty cache);
  decode tok/s at batch 1 after a 128-token prompt, greedy: sc2deploy through the runtime's own decode loop
    (OrtRuntime.decode + argmax), transformers through generate, llama.cpp through
    `llama-bench -p 0 -n NEW -d 128` (llama_decode only: no sampling, no logits copied to Python);
  decode tok/s at batch 8 for sc2deploy int4 (and llama.cpp q4_0 / q4_K_M through llama-batched-bench, if built);
  the bytes of weights one decode step reads (sc2deploy: the artifact's initializers, GGUF: its tensors; an untied
    embedding is a gather of one row a token and is left out, a tied one is the head and counted), against the
    read bandwidth measured in the same run (bench/decode.py's measure_bandwidth): the fraction of the ceiling
    bandwidth / bytes-per-step each runtime reaches (it can pass 1 where the weights stay in a large L3);
  with --one-thread (default), sc2deploy int4 and llama.cpp q4_0 / q4_K_M again at 1 thread ("t1").
Threads: torch (transformers) and llama.cpp are OpenMP, and GNU OpenMP's threads spin at every barrier: fastest on a
quiet machine, but with other work on the 2 cores llama.cpp -t 2 decode collapsed to ~1-18 tok/s (a llama-bench run
past --llama-timeout loses its sample) and transformers' to ~6. --omp-wait passive avoids the collapse (the script
re-runs itself to set OMP_WAIT_POLICY) at a cost: llama.cpp -t 2 decode ~4x slower on a quiet machine. The default
leaves the environment's policy. ONNX Runtime's own thread pool (it spins too) is as sc2deploy makes it.
With --fidelity, on teacher-forced chunks of code text: KL(fp32 || quantized) (mean, p99, max), same top-1 and
top-5 overlap against sc2deploy's eager fp32 reference model, for the sc2deploy artifacts and the GGUFs. llama.cpp's
log-probabilities come from `llama-perplexity --kl-divergence-base` (stored as uint16 per vocabulary entry, a
rounding of at most 16/65535/2 in log-probability), so they too are compared with the fp32 reference, not f16.

The weights are random: speed does not depend on them, but their output distributions are nearly flat (entropy
close to ln(vocab)), so top-1 agreement is fragile and the fidelity figures only rank the formats against each other.
Not a test: run it by hand, e.g.
    bash scripts/build-llama-cpp.sh
    python bench/quant.py [--repeats 5] [--workdir DIR] [--llama-cpp DIR | --skip-llama-cpp] [--fidelity] [--json]
    python bench/quant.py --quick        # a smoke run: 1 repeat, short prompts
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import llamacpp  # noqa: E402  (bench/llamacpp.py)


def load_decode_bench():
    """bench/decode.py as a module: its bandwidth measurement and timing loops are reused as they are."""
    spec = importlib.util.spec_from_file_location("bench_decode", BENCH / "decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


decode_bench = load_decode_bench()

SC2_VARIANTS = ("fp32", "int8", "int4")  # sc2deploy: unquantized, then sc2deploy.quantization.SCHEMES
GGUF_VARIANTS = {"f16": None, "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_K_M": "Q4_K_M"}  # name: llama-quantize type
BATCHED_GGUF = ("q4_0", "q4_K_M")  # llama.cpp contenders timed at batch 8 too (llama-batched-bench)
ONE_THREAD = ("sc2deploy int4", "llama.cpp q4_0", "llama.cpp q4_K_M")  # also timed at 1 thread (--one-thread)
RATIOS = (("sc2deploy int4", "llama.cpp q4_K_M"), ("sc2deploy int4", "llama.cpp q4_0"),
          ("sc2deploy int8", "llama.cpp q8_0"), ("sc2deploy fp32", "transformers fp32"),
          ("sc2deploy fp32", "llama.cpp f16"), ("sc2deploy int4 t1", "llama.cpp q4_K_M t1"),
          ("sc2deploy int4 t1", "llama.cpp q4_0 t1"))
FIDELITY_SOURCES = ("argparse", "inspect", "typing", "dataclasses", "functools", "pathlib", "textwrap")
log = llamacpp.log


# ---------------------------------------------------------------- models
@dataclass
class Models:
    checkpoint: Path
    artifacts: dict[str, Path]  # sc2deploy variant -> artifact folder
    ggufs: dict[str, Path] = field(default_factory=dict)  # GGUF variant -> file


def make_checkpoint(workdir: Path, size: str) -> Path:
    """The random checkpoint of `size` (reused when present), written by `sc2deploy checkpoint`."""
    out = workdir / "checkpoint"
    if not (out / "config.json").is_file():
        log(f"writing the {size} checkpoint ...")
        subprocess.run([sys.executable, "-m", "sc2deploy", "checkpoint", "--size", size, "--out", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
    return out


def export_variants(checkpoint: Path, workdir: Path) -> dict[str, Path]:
    """sc2deploy's ort artifacts of `checkpoint`: fp32 unquantized, and each quantization scheme (reused if present)."""
    from sc2deploy.checkpoint import CheckpointSource
    from sc2deploy.export import export_artifact
    from sc2deploy.quantization import SCHEMES

    artifacts = {}
    for variant in SC2_VARIANTS:
        out = workdir / f"sc2deploy-{variant}"
        if not (out / "sc2deploy.json").is_file():
            log(f"exporting the sc2deploy {variant} artifact ...")
            export_artifact(CheckpointSource(checkpoint), out, "fp32", "ort", quant=SCHEMES.get(variant))
        artifacts[variant] = out
    return artifacts


def make_ggufs(llama: llamacpp.LlamaCpp, checkpoint: Path, workdir: Path, threads: int) -> dict[str, Path]:
    """The checkpoint as GGUF f16, and llama-quantize'd from it (reused when present)."""
    folder = workdir / "gguf"
    folder.mkdir(exist_ok=True)
    f16 = llamacpp.convert_to_gguf(llama, checkpoint, folder / "model-f16.gguf", "f16")
    return {name: f16 if kind is None else
            llamacpp.quantize_gguf(llama, f16, folder / f"model-{name}.gguf", kind, threads)
            for name, kind in GGUF_VARIANTS.items()}


def artifact_bytes(folder: Path) -> dict:
    """Initializer bytes of an sc2deploy artifact: all, and those one decode step reads (every initializer but the
    data of Gather / GatherBlockQuantized nodes, which read one row a token; a tied head's copy is read in full)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) * np.dtype(tensor_dtype_to_np_dtype(t.data_type)).itemsize
             for t in graph.initializer}
    read, gathered = set(), set()
    for node in graph.node:
        for position, name in enumerate(node.input):
            if name not in sizes:
                continue
            is_gather_table = node.op_type in ("Gather", "GatherBlockQuantized") and position != 1  # 1: the indices
            (gathered if is_gather_table else read).add(name)
    ops = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    manifest = json.loads((folder / "sc2deploy.json").read_text())
    return {"tensor_bytes": sum(sizes.values()), "bytes_per_decode_step": sum(sizes[n] for n in read),
            "gathered_bytes": sum(sizes[n] for n in gathered - read),
            "quantization": manifest.get("graph", {}).get("quantization"),
            "quantized_ops": {op: n for op, n in ops.items() if op in ("MatMulNBits", "GatherBlockQuantized")}}


# ---------------------------------------------------------------- contenders
@dataclass
class Contender:
    """One runtime on one set of weights; `measure()` times it once and returns {metric: [tok/s samples]}."""
    name: str
    bytes_per_step: int
    measure: Callable[[], dict[str, list[float]]]
    torch_threads: int  # what torch gets while this one runs (ORT: 1, so torch's spinning workers stay off its cores)


def time_prefill(runtime, prompt: list[int]) -> float:
    """Prefill tok/s of one prompt into slot 0 (logits of the last token only)."""
    start = time.perf_counter()
    runtime.prefill(0, prompt)
    return len(prompt) / (time.perf_counter() - start)


def time_transformers_prefill(model, prompt: list[int]) -> float:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
    return len(prompt) / (time.perf_counter() - start)


@dataclass
class Workload:
    prompts: list[int]  # prefill lengths, the first is also the decode context
    new: int
    batch: int
    vocab: int
    tool_timeout: float | None = None  # seconds one llama.cpp tool run may take before its sample is dropped

    @property
    def context(self) -> int:
        return self.prompts[0]

    def prompt(self, length: int) -> list[int]:
        return decode_bench.prompts_for(1, length, self.vocab)[0]

    def batch_prompts(self) -> list[list[int]]:
        return decode_bench.prompts_for(self.batch, self.context, self.vocab)


def sc2deploy_contender(variant: str, artifact: Path, work: Workload, threads: int, batched: bool,
                        suffix: str = "") -> Contender:
    from sc2deploy.runtime.onnxruntime import OrtRuntime

    capacity = max(max(work.prompts), work.context + work.new + 1)
    single = OrtRuntime(artifact, max_batch=1, capacity=capacity, threads=threads)
    multi = OrtRuntime(artifact, max_batch=work.batch, capacity=capacity, threads=threads) if batched else None
    prompts = {length: work.prompt(length) for length in work.prompts}
    rows = work.batch_prompts()

    def measure() -> dict[str, list[float]]:
        got = {f"prefill_{n}": [time_prefill(single, p)] for n, p in prompts.items()}
        got["decode"] = [decode_bench.time_runtime(single, [prompts[work.context]], work.new)["decode_tok_s"]]
        if multi is not None:
            got[f"decode_b{work.batch}"] = [decode_bench.time_runtime(multi, rows, work.new)["decode_tok_s"]]
        return got

    return Contender(f"sc2deploy {variant}{suffix}", artifact_bytes(artifact)["bytes_per_decode_step"], measure, 1)


def transformers_contender(checkpoint: Path, work: Workload, threads: int, step_bytes: int) -> Contender:
    from transformers import Starcoder2ForCausalLM

    model = Starcoder2ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompts = {length: work.prompt(length) for length in work.prompts}

    def measure() -> dict[str, list[float]]:
        got = {f"prefill_{n}": [time_transformers_prefill(model, p)] for n, p in prompts.items()}
        got["decode"] = [decode_bench.time_transformers(model, [prompts[work.context]], work.new)["decode_tok_s"]]
        return got

    return Contender("transformers fp32", step_bytes, measure, threads)


def llama_contender(llama: llamacpp.LlamaCpp, variant: str, gguf: Path, work: Workload, threads: int,
                    batched: bool, suffix: str = "") -> Contender:
    def measure() -> dict[str, list[float]]:
        got = llamacpp.llama_bench(llama, gguf, threads, work.prompts, work.new, depth=work.context,
                                   timeout=work.tool_timeout)
        if batched:
            got[f"decode_b{work.batch}"] = llamacpp.llama_batched_decode(llama, gguf, threads, work.context,
                                                                         work.new, work.batch, work.tool_timeout)
        return got

    return Contender(f"llama.cpp {variant}{suffix}", llamacpp.gguf_summary(llama, gguf)["bytes_per_decode_step"],
                     measure, threads)


def warm_up(contenders: list[Contender], threads: int) -> None:
    """One untimed pass of each in-process contender (first runs allocate; llama-bench warms itself up)."""
    for c in contenders:
        if not c.name.startswith("llama.cpp"):
            torch.set_num_threads(c.torch_threads)
            c.measure()
    torch.set_num_threads(threads)


def run_interleaved(contenders: list[Contender], repeats: int, threads: int) -> tuple[dict, list[float], list[float]]:
    """`repeats` rounds; each measures the bandwidth and then every contender once.
    Returns ({name: {metric: [samples]}}, bandwidth samples in bytes/s, 1-minute load averages)."""
    samples: dict[str, dict[str, list[float]]] = {c.name: {} for c in contenders}
    bandwidths, loads = [], [os.getloadavg()[0]]
    for repeat in range(repeats):
        log(f"repeat {repeat + 1}/{repeats} ...")
        torch.set_num_threads(threads)
        bandwidths.append(decode_bench.measure_bandwidth())
        for c in contenders:
            torch.set_num_threads(c.torch_threads)
            for metric, values in c.measure().items():
                samples[c.name].setdefault(metric, []).extend(values)
        loads.append(os.getloadavg()[0])
    torch.set_num_threads(threads)
    return samples, bandwidths, loads


def summarize(values: list[float]) -> dict:
    return {"best": max(values), "median": statistics.median(values), "worst": min(values), "n": len(values),
            "spread": (max(values) - min(values)) / statistics.median(values)}


# ---------------------------------------------------------------- fidelity
@dataclass
class FidelityText:
    chunks: np.ndarray  # (n, context) int tokens, as fed to every model (BOS first where llama.cpp adds one)
    first: int  # scored positions: first .. context-2 (their logits predict tokens first+1 ..)


def write_fidelity_text(path: Path, tokenizer_json: Path, tokens_needed: int) -> Path:
    """Python standard library sources (code, deterministic for a Python version) until `tokens_needed` tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    text = ""
    for module in FIDELITY_SOURCES:
        text += Path(importlib.util.find_spec(module).origin).read_text(encoding="utf-8")
        if len(tokenizer.encode(text).ids) >= tokens_needed * 1.1:
            break
    path.write_text(text, encoding="utf-8")
    return path


def sc2deploy_chunks(text: Path, tokenizer_json: Path, context: int, chunks: int) -> FidelityText:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_json)).encode(text.read_text(encoding="utf-8")).ids
    if len(ids) < context * chunks:
        raise ValueError(f"the fidelity text has {len(ids)} tokens, fewer than {context} x {chunks}")
    return FidelityText(np.asarray(ids[:context * chunks]).reshape(chunks, context), context // 2)


def log_softmax(logits: torch.Tensor) -> np.ndarray:
    return torch.log_softmax(logits.float(), dim=-1).numpy()


def runtime_log_probs(runtime, text: FidelityText):
    """Yield (scored, vocab) log-probs of each chunk, teacher-forced through `runtime` (one prefill a chunk)."""
    context = text.chunks.shape[1]
    for chunk in text.chunks:
        logits = runtime.prefill(0, chunk.tolist(), all_logits=True)
        yield log_softmax(logits[text.first:context - 1])


def compare(reference: list[np.ndarray], candidate) -> dict:
    """KL(reference || candidate) per position (mean, p99, max), same top-1 rate, mean top-5 overlap."""
    kls, same_top1, overlap = [], [], []
    for ref, got in zip(reference, candidate):
        p = np.exp(ref)
        kls.append((p * (ref - got)).sum(axis=1))
        same_top1.append(ref.argmax(axis=1) == got.argmax(axis=1))
        top_ref = np.argpartition(-ref, 5, axis=1)[:, :5]
        top_got = np.argpartition(-got, 5, axis=1)[:, :5]
        overlap.append(np.array([len(set(a) & set(b)) / 5 for a, b in zip(top_ref, top_got)]))
    kl = np.concatenate(kls)
    return {"positions": int(kl.size), "kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
            "kl_max": float(kl.max()), "same_top1": float(np.concatenate(same_top1).mean()),
            "top5_overlap": float(np.concatenate(overlap).mean())}


def reference_summary(reference: list[np.ndarray]) -> dict:
    """How peaked the fp32 reference is: random weights give nearly flat distributions, which make top-1 fragile."""
    logp = np.concatenate(reference)
    entropy = -(np.exp(logp) * logp).sum(axis=1)
    return {"entropy_mean_nats": float(entropy.mean()), "uniform_entropy_nats": float(np.log(logp.shape[1])),
            "top1_probability_mean": float(np.exp(logp.max(axis=1)).mean())}


def run_fidelity(models: Models, llama: llamacpp.LlamaCpp | None, workdir: Path, context: int, chunks: int,
                 threads: int) -> dict:
    """Every quantized model (and llama.cpp f16) against sc2deploy's eager fp32 model on the same tokens."""
    from sc2deploy.checkpoint import CheckpointSource
    from sc2deploy.runtime.eager import EagerRuntime
    from sc2deploy.runtime.onnxruntime import OrtRuntime

    tokenizer_json = models.checkpoint / "tokenizer.json"
    text_file = write_fidelity_text(workdir / "fidelity.txt", tokenizer_json, context * chunks)
    dumps = {}
    if llama is not None:
        for variant, gguf in models.ggufs.items():
            log(f"fidelity: llama.cpp {variant} log-probs ...")
            out = llamacpp.dump_log_probs(llama, gguf, text_file, context, chunks, threads,
                                          workdir / f"logprobs-{variant}-{context}x{chunks}.bin")
            dumps[variant] = llamacpp.read_log_probs(out)
    # The tokens llama.cpp fed (with BOS first when the GGUF asks for it) are the tokens for everyone.
    text = sc2deploy_chunks(text_file, tokenizer_json, context, chunks)
    bos_note = "no BOS"
    if dumps:
        dump = dumps["f16"]
        meta = llamacpp.gguf_summary(llama, models.ggufs["f16"])["metadata"]
        chunks_fed = dump.tokens.astype(np.int64).copy()
        if meta.get("tokenizer.ggml.add_bos_token"):
            bos = llamacpp.gguf_reader(llama, models.ggufs["f16"]).fields["tokenizer.ggml.bos_token_id"].contents()
            chunks_fed[:, 0] = bos
            bos_note = f"BOS {bos} first (llama.cpp adds it)"
        same_tokens = bool(np.array_equal(dump.tokens, text.chunks))
        text = FidelityText(chunks_fed, dump.first)
    torch.set_num_threads(threads)
    log("fidelity: the eager fp32 reference ...")
    eager = EagerRuntime(CheckpointSource(models.checkpoint), max_batch=1, capacity=context, threads=threads)
    reference = list(runtime_log_probs(eager, text))
    del eager
    results = {}
    for variant in SC2_VARIANTS[1:]:
        log(f"fidelity: sc2deploy {variant} ...")
        runtime = OrtRuntime(models.artifacts[variant], max_batch=1, capacity=context, threads=threads)
        results[f"sc2deploy {variant}"] = compare(reference, runtime_log_probs(runtime, text))
        torch.set_num_threads(threads)
    for variant, dump in dumps.items():
        results[f"llama.cpp {variant}"] = compare(reference, (dump.log_probs(i) for i in range(len(dump.tokens))))
    report = {"context": context, "chunks": chunks, "scored_positions_per_chunk": context - 1 - text.first,
              "text": f"Python {sys.version_info.major}.{sys.version_info.minor} stdlib sources "
                      f"({', '.join(FIDELITY_SOURCES)}), {bos_note}",
              "reference": "sc2deploy EagerRuntime fp32 on the checkpoint", **reference_summary(reference),
              "results": results}
    if dumps:
        report["llama_cpp_tokens_match_sc2deploy_tokenizer"] = same_tokens
    return report


# ---------------------------------------------------------------- report
def ratio_table(results: dict, metrics: list[str]) -> dict:
    table = {}
    for a, b in RATIOS:
        if a in results and b in results:
            table[f"{a} / {b}"] = {m: {"best": results[a][m]["best"] / results[b][m]["best"],
                                       "median": results[a][m]["median"] / results[b][m]["median"]}
                                   for m in metrics if m in results[a] and m in results[b]}
    return {pair: ratios for pair, ratios in table.items() if ratios}


def print_report(report: dict) -> None:
    m, w = report["machine"], report["workload"]
    bw = report["bandwidth_gb_s"]
    print(f"machine: {m['cpus']} cpus, {m['threads']} threads; read bandwidth {bw['best']:.1f} GB/s best "
          f"(median {bw['median']:.1f}); load avg {min(m['load_avg_1min']):.1f}-{max(m['load_avg_1min']):.1f}")
    print(f"model: {report['model']['size']}, {report['model']['parameters'] / 1e6:.0f}M parameters (random); "
          f"{report['repeats']} interleaved repeats; figures are best (median) tok/s; "
          f"spread = (max-min)/median of decode")
    if report["llama_cpp"] is None:
        print("llama.cpp: SKIPPED (--skip-llama-cpp): no llama.cpp figures below")
    else:
        lc = report["llama_cpp"]
        windows = {v: g["metadata"].get("starcoder2.attention.sliding_window") for v, g in lc["ggufs"].items()}
        print(f"llama.cpp: {lc['version'].removeprefix('version: ')} from {lc['bin']}, OMP_WAIT_POLICY="
              f"{lc['omp_wait_policy']}; sliding window in the GGUFs: {set(windows.values())} (None: full attention); "
              f"decode timed by llama-bench (llama_decode only, no sampling)")
    prefills = [f"prefill_{n}" for n in w["prompts"]]
    batch = f"decode_b{w['batch']}"
    header = (f"{'runtime':<19}{'MB/step':>8}" + "".join(f"{'prefill ' + p.split('_')[1]:>17}" for p in prefills)
              + f"{'decode b1':>17}{'spread':>8}{'of ceiling':>11}")
    print(header)
    repeats = report["repeats"]
    for name, r in report["results"].items():
        step = report["bytes_per_decode_step"][name]
        ceiling = bw["best"] * 1e9 / step
        cells = "".join(f"{_cell(r.get(p), repeats):>17}" for p in prefills)
        d = r.get("decode")
        spread = f"{d['spread'] * 100:>7.0f}%{d['best'] / ceiling:>11.2f}" if d else f"{'-':>8}{'-':>11}"
        print(f"{name:<19}{step / 1e6:>8.1f}{cells}{_cell(d, repeats):>17}{spread}")
    print(f"decode after a {w['context']}-token prompt, {w['new']} steps; ceiling = bandwidth / bytes per step; "
          f"n=: samples, where a llama.cpp run timed out")
    for name, r in report["results"].items():
        if batch in r and "decode" in r:
            ceiling = w["batch"] * bw["best"] * 1e9 / report["bytes_per_decode_step"][name]
            print(f"batch {w['batch']}: {name:<18} decode {_cell(r[batch], repeats)} tok/s = "
                  f"{r[batch]['best'] / r['decode']['best']:.2f}x its batch 1; {r[batch]['best'] / ceiling:.2f} of "
                  f"the batch-{w['batch']} ceiling ({ceiling:.0f})")
    for pair, ratios in report["ratios"].items():
        print(f"{pair:<40}" + "  ".join(f"{k} {v['best']:.2f} ({v['median']:.2f})" for k, v in ratios.items()))
    if fidelity := report.get("fidelity"):
        print(f"fidelity vs eager fp32: {fidelity['chunks']} chunks of {fidelity['context']} tokens, "
              f"{fidelity['scored_positions_per_chunk']} scored each ({fidelity['text']}); reference entropy "
              f"{fidelity['entropy_mean_nats']:.2f} nats (uniform {fidelity['uniform_entropy_nats']:.2f}), "
              f"top-1 p {fidelity['top1_probability_mean']:.4f}")
        print(f"{'model':<19}{'KL mean':>11}{'KL p99':>11}{'KL max':>11}{'same top1':>11}{'top5 overlap':>14}")
        for name, f in fidelity["results"].items():
            print(f"{name:<19}{f['kl_mean']:>11.2e}{f['kl_p99']:>11.2e}{f['kl_max']:>11.2e}{f['same_top1']:>11.3f}"
                  f"{f['top5_overlap']:>14.3f}")


def _cell(s: dict | None, repeats: int) -> str:
    if not s:
        return "-"
    text = f"{s['best']:.1f} ({s['median']:.1f})"
    return text if s["n"] >= repeats else f"{text} n={s['n']}"


# ---------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="bench")
    parser.add_argument("--prompts", type=int, nargs="+", default=[128, 512],
                        help="prefill lengths; the first is also the decode context (default 128 512)")
    parser.add_argument("--new", type=int, default=64, help="decode steps timed (default 64)")
    parser.add_argument("--batch", type=int, default=8, help="the batched decode (sc2deploy int4; default 8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the checkpoint, artifacts and GGUFs here and reuse them (default: a temp dir)")
    parser.add_argument("--llama-cpp", type=Path, default=None, metavar="DIR",
                        help="the folder scripts/build-llama-cpp.sh printed (default: the newest in its cache)")
    parser.add_argument("--skip-llama-cpp", action="store_true")
    parser.add_argument("--omp-wait", choices=["passive", "active", "inherit"], default="inherit",
                        help="OMP_WAIT_POLICY for torch here and llama.cpp's timed tools, both OpenMP (default "
                             "inherit: the environment's, normally GNU's spin-then-sleep). Spinning is fastest on a "
                             "quiet machine but collapsed llama.cpp -t 2 decode to ~1 tok/s and transformers' to ~6 "
                             "with other work on the 2 cores; passive avoids that and costs llama.cpp -t 2 ~4x")
    parser.add_argument("--llama-timeout", type=float, default=60.0, metavar="S",
                        help="seconds one llama-bench run may take; past it the sample is dropped (default 60)")
    parser.add_argument("--one-thread", action=argparse.BooleanOptionalAction, default=True,
                        help="also time sc2deploy int4 and llama.cpp q4_0 / q4_K_M at 1 thread (default on)")
    parser.add_argument("--fidelity", action="store_true", help="also KL / top-1 / top-5 against the fp32 reference")
    parser.add_argument("--fidelity-only", action="store_true", help="only the fidelity part, no timing")
    parser.add_argument("--fidelity-context", type=int, default=512)
    parser.add_argument("--fidelity-chunks", type=int, default=4)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 repeat, prompts 32 64, 8 steps, fidelity on 2 chunks of 128")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    parser.add_argument("--save", type=Path, default=None, metavar="FILE", help="also write the JSON report to FILE")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.prompts, args.new = 1, [32, 64], 8
        args.fidelity_context, args.fidelity_chunks = 128, 2
    args.fidelity = args.fidelity or args.fidelity_only
    return args


def main() -> int:
    args = parse_args()
    apply_omp_wait_policy(args.omp_wait)
    from sc2deploy.config import preset

    config = preset(args.size)
    torch.set_num_threads(args.threads)
    wait = None if args.omp_wait == "inherit" else args.omp_wait.upper()
    llama = None if args.skip_llama_cpp else llamacpp.find_llama_cpp(args.llama_cpp, wait)
    if args.skip_llama_cpp:
        log("--skip-llama-cpp: llama.cpp figures will be ABSENT from this run")
    with tempfile.TemporaryDirectory(prefix="sc2-quant-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoint = make_checkpoint(workdir, args.size)
        models = Models(checkpoint, export_variants(checkpoint, workdir))
        if llama is not None:
            models.ggufs = make_ggufs(llama, checkpoint, workdir, args.threads)
        report = {"machine": {"cpus": os.cpu_count(), "threads": args.threads,
                              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
                  "model": {"size": args.size, "parameters": config.num_parameters, "random_weights": True},
                  "llama_cpp": None if llama is None else describe_llama(llama, models)}
        report["artifacts"] = {v: artifact_bytes(a) for v, a in models.artifacts.items()}
        if not args.fidelity_only:
            report.update(run_speed(args, config, models, llama))
        if args.fidelity:
            report["fidelity"] = run_fidelity(models, llama, workdir, args.fidelity_context, args.fidelity_chunks,
                                              args.threads)
    if args.save:
        args.save.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    elif not args.fidelity_only:
        print_report(report)
    else:
        print(json.dumps(report["fidelity"], indent=2))
    return 0


def apply_omp_wait_policy(policy: str) -> None:
    """OpenMP reads OMP_WAIT_POLICY when torch loads it, before any flag is parsed: re-run this script with it set."""
    if policy == "inherit" or os.environ.get("OMP_WAIT_POLICY", "").lower() == policy:
        return
    log(f"re-running with OMP_WAIT_POLICY={policy.upper()} ...")
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OMP_WAIT_POLICY": policy.upper()})


def describe_llama(llama: llamacpp.LlamaCpp, models: Models) -> dict:
    summaries = {v: llamacpp.gguf_summary(llama, g) for v, g in models.ggufs.items()}
    return {"version": llama.version(), "bin": str(llama.bin), "omp_wait_policy": llama.omp_wait_policy,
            "ggufs": summaries,
            "note": "decode via llama-bench -d (llama_decode only); KV cache f16; no sliding window in the GGUF "
                    "(llama.cpp's StarCoder2 attends over the whole context; the contexts here are below the window)"}


def one_thread_contenders(models: Models, llama: llamacpp.LlamaCpp | None, work: Workload) -> list[Contender]:
    """The int4 / q4 contenders again at 1 thread ("t1"): on a 2-core machine shared with other work, one thread
    loses less to a busy core than two that must meet at every op."""
    found = [sc2deploy_contender(v, a, work, 1, batched=False, suffix=" t1") for v, a in models.artifacts.items()
             if f"sc2deploy {v}" in ONE_THREAD]
    if llama is not None:
        found += [llama_contender(llama, v, g, work, 1, batched=False, suffix=" t1") for v, g in models.ggufs.items()
                  if f"llama.cpp {v}" in ONE_THREAD]
    return found


def run_speed(args, config, models: Models, llama: llamacpp.LlamaCpp | None) -> dict:
    work = Workload(args.prompts, args.new, args.batch, config.vocab_size, args.llama_timeout)
    log("loading the runtimes ...")
    contenders = [sc2deploy_contender(v, a, work, args.threads, batched=(v == "int4"))
                  for v, a in models.artifacts.items()]
    if llama is not None:
        batched = llama.has("llama-batched-bench")
        contenders += [llama_contender(llama, v, g, work, args.threads, batched and v in BATCHED_GGUF)
                       for v, g in models.ggufs.items()]
    contenders.append(transformers_contender(models.checkpoint, work, args.threads,
                                             artifact_bytes(models.artifacts["fp32"])["bytes_per_decode_step"]))
    if args.one_thread and args.threads != 1:
        contenders += one_thread_contenders(models, llama, work)
    warm_up(contenders, args.threads)
    samples, bandwidths, loads = run_interleaved(contenders, args.repeats, args.threads)
    results = {name: {metric: summarize(v) for metric, v in metrics.items() if v} for name, metrics in samples.items()}
    metrics = [f"prefill_{n}" for n in work.prompts] + ["decode", f"decode_b{work.batch}"]
    bandwidth = summarize(bandwidths)
    steps = {c.name: c.bytes_per_step for c in contenders}
    for c in contenders:
        for metric, s in results[c.name].items():
            if metric.startswith("decode"):
                rows = work.batch if metric != "decode" else 1
                s["fraction_of_ceiling"] = s["best"] * steps[c.name] / (rows * bandwidth["best"])
    return {"machine": {"cpus": os.cpu_count(), "threads": args.threads, "load_avg_1min": loads,
                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
            "workload": {"prompts": work.prompts, "context": work.context, "new": work.new, "batch": work.batch},
            "repeats": args.repeats, "bandwidth_gb_s": {k: v / 1e9 if k != "n" and k != "spread" else v
                                                         for k, v in bandwidth.items()},
            "bytes_per_decode_step": steps, "results": results, "samples": samples,
            "ratios": ratio_table(results, metrics)}


if __name__ == "__main__":
    sys.exit(main())
