"""llama.cpp for bench/quant.py: find the tools built by scripts/build-llama-cpp.sh, convert a Hugging Face
checkpoint to GGUF and quantize it, time it with llama-bench, count the bytes a decode step reads, and
dump per-position log-probabilities with llama-perplexity.

Every tool runs as a subprocess; nothing here imports llama.cpp's Python bindings. The converter
(convert_hf_to_gguf.py) and the `gguf` package come from the vendored llama.cpp tree beside the
binaries, run with this interpreter (it needs torch, numpy and transformers, which sc2deploy has).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOOLS = ("llama-bench", "llama-quantize", "llama-perplexity")
OPTIONAL_TOOLS = ("llama-batched-bench",)
CONVERTER = "convert_hf_to_gguf.py"
LOGITS_MAGIC = b"_logits_"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class LlamaCpp:
    """Where the tools are: `bin` holds the binaries, `source` the vendored llama.cpp tree (converter, gguf-py).

    omp_wait_policy: OMP_WAIT_POLICY for the timed tools (built with OpenMP, libgomp); None: the environment's.
    Every op ends in a barrier, so it decides `-t 2` decode on 2 cores. Measured on the bench model (q4_K_M,
    tg64): GNU's default (threads spin at a barrier) ~215 tok/s on a quiet machine but ~1-18 when another
    process keeps one core busy; PASSIVE (they sleep) ~52 quiet, ~75 busy. 1 thread: ~80-95 either way.
    """
    bin: Path
    source: Path
    omp_wait_policy: str | None = None

    def tool_env(self, omp_wait_policy: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        if policy := omp_wait_policy or self.omp_wait_policy:
            env["OMP_WAIT_POLICY"] = policy
        return env

    def tool(self, name: str) -> Path:
        return self.bin / name

    def has(self, name: str) -> bool:
        return (self.bin / name).is_file() and os.access(self.bin / name, os.X_OK)

    def python_env(self) -> dict[str, str]:
        """The environment for the converter: the vendored gguf-py first on PYTHONPATH."""
        paths = [str(self.source / "gguf-py"), str(self.source)]
        if os.environ.get("PYTHONPATH"):
            paths.append(os.environ["PYTHONPATH"])
        return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}

    def version(self) -> str:
        done = subprocess.run([str(self.tool("llama-bench")), "--version"], capture_output=True, text=True)
        lines = (done.stdout + done.stderr).strip().splitlines()
        return next((line for line in lines if line.startswith("version")), lines[0] if lines else "unknown")


def find_llama_cpp(folder: str | Path | None, omp_wait_policy: str | None = None) -> LlamaCpp:
    """The tools under `folder` (what scripts/build-llama-cpp.sh printed, or a bin/ folder inside it); default: the
    newest build in $SC2_LLAMA_CPP_CACHE (~/.cache/sc2deploy/llama.cpp). FileNotFoundError says what is missing."""
    if folder is None:
        cache = Path(os.environ.get("SC2_LLAMA_CPP_CACHE", Path.home() / ".cache/sc2deploy/llama.cpp"))
        builds = sorted((p for p in cache.glob("*") if (p / "bin").is_dir()), key=lambda p: p.stat().st_mtime)
        if not builds:
            raise FileNotFoundError(f"no llama.cpp build in {cache}: run scripts/build-llama-cpp.sh, or pass "
                                    f"--llama-cpp DIR, or --skip-llama-cpp")
        folder = builds[-1]
    folder = Path(folder).expanduser().resolve()
    bins = [b for b in (folder, folder / "bin", folder / "build" / "bin") if (b / "llama-bench").is_file()]
    sources = [s for s in (folder, folder / "llama.cpp", folder.parent, folder.parent / "llama.cpp")
               if (s / CONVERTER).is_file()]
    if not bins or not sources:
        raise FileNotFoundError(f"{folder} holds no llama.cpp build (llama-bench and {CONVERTER}): give the folder "
                                f"scripts/build-llama-cpp.sh printed")
    found = LlamaCpp(bins[0], sources[0], omp_wait_policy)
    if missing := [t for t in TOOLS if not found.has(t)]:
        raise FileNotFoundError(f"{found.bin} lacks {', '.join(missing)}: rerun scripts/build-llama-cpp.sh")
    return found


def run_tool(command: list[str], what: str, env: dict[str, str] | None = None,
             timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run `command`; on failure raise with the tail of its output (subprocess.TimeoutExpired past `timeout` s)."""
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {' '.join(command)}\n{tail}")
    return done


# ---------------------------------------------------------------- making the models
def convert_to_gguf(llama: LlamaCpp, checkpoint: Path, out: Path, outtype: str = "f16") -> Path:
    """convert_hf_to_gguf.py `checkpoint` -> `out` (skipped when `out` exists)."""
    if out.is_file():
        return out
    log(f"converting {checkpoint} to GGUF {outtype} ...")
    partial = out.with_name(out.name + ".partial")
    run_tool([sys.executable, str(llama.source / CONVERTER), str(checkpoint), "--outtype", outtype,
              "--outfile", str(partial)], "convert_hf_to_gguf.py", env=llama.python_env())
    partial.rename(out)
    return out


def quantize_gguf(llama: LlamaCpp, source: Path, out: Path, kind: str, threads: int) -> Path:
    """llama-quantize `source` -> `out` as `kind` (Q8_0, Q4_0, Q4_K_M ...; skipped when `out` exists)."""
    if out.is_file():
        return out
    log(f"quantizing {source.name} to {kind} ...")
    partial = out.with_name(out.name + ".partial")
    run_tool([str(llama.tool("llama-quantize")), str(source), str(partial), kind, str(threads)], "llama-quantize",
             env=llama.tool_env())
    partial.rename(out)
    return out


# ---------------------------------------------------------------- reading a GGUF
def gguf_reader(llama: LlamaCpp, path: Path):
    """gguf-py's GGUFReader on `path`, imported from the vendored tree."""
    if str(llama.source / "gguf-py") not in sys.path:
        sys.path.insert(0, str(llama.source / "gguf-py"))
    from gguf import GGUFReader

    return GGUFReader(str(path))


def gguf_summary(llama: LlamaCpp, path: Path) -> dict:
    """Tensor bytes of a GGUF: all of them, the bytes one decode step reads, the tensor types, and the metadata
    bench/quant.py reports (sliding window, add_bos)."""
    reader = gguf_reader(llama, path)
    tensors = {t.name: (int(t.n_bytes), t.tensor_type.name) for t in reader.tensors}
    # The token embedding is a gather (one row a token) unless there is no output.weight: then the head is tied
    # to it and every step reads all of it.
    tied = "output.weight" not in tensors
    gathered = 0 if tied else tensors["token_embd.weight"][0]
    types: dict[str, int] = {}
    for nbytes, kind in tensors.values():
        types[kind] = types.get(kind, 0) + nbytes
    return {
        "file_bytes": path.stat().st_size,
        "tensor_bytes": sum(n for n, _ in tensors.values()),
        "bytes_per_decode_step": sum(n for n, _ in tensors.values()) - gathered,
        "tied_head": tied,
        "embedding_type": tensors["token_embd.weight"][1],
        "bytes_by_type": types,
        "metadata": {key: _field_value(reader, key) for key in reader.fields if "sliding_window" in key
                     or key.endswith(("add_bos_token", "context_length", "tokenizer.ggml.pre"))},
    }


def _field_value(reader, key: str):
    field = reader.fields[key]
    try:
        return field.contents()
    except Exception:  # older gguf-py: no contents(); the raw last part is enough for a scalar
        return field.parts[-1].tolist()


# ---------------------------------------------------------------- timing
def llama_bench(llama: LlamaCpp, model: Path, threads: int, prompts: list[int], new: int, depth: int,
                repetitions: int = 1, timeout: float | None = None) -> dict[str, list[float]]:
    """llama-bench: prefill tok/s for each of `prompts` (from an empty context) and decode tok/s of `new` tokens
    after `depth` tokens of context. Two runs (prefill, decode), since llama-bench's depth applies to every test.
    Returns {"prefill_<n>": [tok/s per repetition], "decode": [...]}; a run past `timeout` s adds nothing."""
    base = [str(llama.tool("llama-bench")), "-m", str(model), "-t", str(threads), "-r", str(repetitions), "-o", "json"]
    prefill = _bench_json(base + ["-p", ",".join(map(str, prompts)), "-n", "0"], llama.tool_env(), timeout)
    decode = _bench_json(base + ["-p", "0", "-n", str(new), "-d", str(depth)], llama.tool_env(), timeout)
    found: dict[str, list[float]] = {}
    for test in prefill:
        found[f"prefill_{test['n_prompt']}"] = _samples(test)
    for test in decode:
        found["decode"] = _samples(test)
    return found


def _bench_json(command: list[str], env: dict[str, str], timeout: float | None) -> list[dict]:
    try:
        out = run_tool(command, "llama-bench", env=env, timeout=timeout).stdout
    except subprocess.TimeoutExpired:
        log(f"llama-bench ran past {timeout:.0f} s, no sample this time (OpenMP threads spinning against other "
            f"work on the machine? see --omp-wait): {' '.join(command)}")
        return []
    return json.loads(out[out.index("["):])


def _samples(test: dict) -> list[float]:
    return [float(x) for x in test.get("samples_ts") or [test["avg_ts"]]]


def llama_batched_decode(llama: LlamaCpp, model: Path, threads: int, prompt: int, new: int, batch: int,
                         timeout: float | None = None) -> list[float]:
    """llama-batched-bench: [decode tok/s (all sequences)] of `batch` sequences of `prompt` tokens generating `new`;
    [] past `timeout` s."""
    command = [str(llama.tool("llama-batched-bench")), "-m", str(model), "-t", str(threads), "-c",
               str(batch * (prompt + new) + 16), "-b", "2048", "-ub", "512", "-npp", str(prompt), "-ntg", str(new),
               "-npl", str(batch), "--output-format", "jsonl"]
    try:
        out = run_tool(command, "llama-batched-bench", env=llama.tool_env(), timeout=timeout).stdout
    except subprocess.TimeoutExpired:
        log(f"llama-batched-bench ran past {timeout:.0f} s, no sample this time: {' '.join(command)}")
        return []
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [float(rows[-1]["speed_tg"])]


# ---------------------------------------------------------------- log-probabilities (fidelity)
def dump_log_probs(llama: LlamaCpp, model: Path, text: Path, context: int, chunks: int, threads: int,
                   out: Path) -> Path:
    """llama-perplexity --kl-divergence-base: `model`'s log-probabilities over `chunks` chunks of `context` tokens
    of `text`, written to `out` (the file llama-perplexity --kl-divergence compares against)."""
    run_tool([str(llama.tool("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", str(context),
              "-b", str(context), "--chunks", str(chunks), "-t", str(threads), "--kl-divergence-base", str(out)],
             "llama-perplexity --kl-divergence-base", env=llama.tool_env("PASSIVE"))  # untimed: never stall
    return out


@dataclass
class LogProbDump:
    """A --kl-divergence-base file: the tokens of every chunk, and log-probs of the scored positions.

    llama-perplexity scores positions first = context // 2 .. context - 2 of each chunk (the logits there
    predict tokens first+1 ..). Each scored position is stored as two floats (scale, min_log_prob) and
    n_vocab uint16 q, with log p = min_log_prob + scale * q (q = 0 for logits more than 16 below the top);
    renormalised here, so the rounding (scale <= 16/65535) is all that remains of the storage.
    """
    context: int
    vocab: int
    tokens: np.ndarray  # (chunks, context) int32 as tokenized; llama-perplexity feeds BOS first when the model adds one
    records: np.ndarray  # (chunks, scored, 4 + vocab rounded up to even) uint16: the file, not copied

    @property
    def first(self) -> int:
        return self.context // 2

    @property
    def scored(self) -> int:
        return self.context - 1 - self.first

    def log_probs(self, chunk: int) -> np.ndarray:
        """(scored, vocab) float32 log-probabilities of chunk `chunk`, normalised."""
        rows = self.records[chunk]
        head = np.ascontiguousarray(rows[:, :4]).view(np.float32)  # (scored, 2): scale, min_log_prob
        values = rows[:, 4:4 + self.vocab].astype(np.float32) * head[:, :1]
        values -= values.max(axis=1, keepdims=True)
        values -= np.log(np.exp(values).sum(axis=1, keepdims=True))
        return values


def read_log_probs(path: Path) -> LogProbDump:
    data = np.memmap(path, dtype=np.uint8, mode="r")
    if bytes(data[:8]) != LOGITS_MAGIC:
        raise ValueError(f"{path} is not a llama-perplexity --kl-divergence-base file")
    context, vocab, chunks = np.frombuffer(data[8:20], dtype=np.int32).tolist()
    tokens_end = 20 + chunks * context * 4
    tokens = np.frombuffer(data[20:tokens_end], dtype=np.int32).reshape(chunks, context)
    stride = 2 * ((vocab + 1) // 2) + 4  # uint16 per scored position
    scored = context - 1 - context // 2
    records = np.frombuffer(data[tokens_end:], dtype=np.uint16)
    if records.size != chunks * scored * stride:
        raise ValueError(f"{path}: {records.size} uint16 of log-probs, expected {chunks * scored * stride}")
    return LogProbDump(context, vocab, tokens, records.reshape(chunks, scored, stride))
