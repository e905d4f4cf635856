"""Decode tokens/s on a GPU: sc2deploy's cuda runtime vs its eager reference model vs transformers' generate.

For each size (StarCoder2 3b and 15b by default) one copy of random bf16 weights is made on the
device (`sc2deploy.checkpoint.random_model`, seed 0) and shared by three runtimes, measured in
the same run at each batch size B (1, 8 and 32 by default), all greedy, after the same random
prompt of --prompt-len tokens per row:
  eager         the reference model `sc2deploy.model.Starcoder2` called directly, as `sc2deploy
                selftest`'s eager part does: forward(ids, attention_mask, cache) with per-layer
                (key, value) caches of window positions; one prefill of the B prompts, then decode
                steps of one token per row (argmax on the device).
  transformers  `transformers.Starcoder2ForCausalLM` holding the same weight tensors (built on the
                meta device, then load_state_dict(assign=True)); decode time of n tokens =
                generate(n + 1 new tokens) - generate(1 new token), which removes the prefill
                (the best of 2 and of 3 runs, after a warm-up generate);
                n = --transformers-steps (default min(--steps, 16): it is slow). An anchor only: if
                it fails, its error is reported and the others still run.
  cuda          `sc2deploy.runtime.cuda.CudaRuntime(model=..., max_batch=B)`: Triton attention,
                decode as CUDA graphs captured when it opens (not timed); every slot is prefilled
                with its prompt (not timed), then `decode(all B slots, tokens)` with the tokens of
                the previous step's argmax.
eager and cuda run 2 untimed warm-up steps, then --steps timed steps with the device synchronised
before and after the loop:
  tok/s = B * steps / time,   ms/step = 1000 * time / steps.

The bound, measured in the same run: HBM bandwidth = the best of several device-to-device copies
of a --copy-gib GiB bf16 tensor into another, counting read + write (2 * bytes / time). A decode
step must read at least
  bytes/step = every weight byte (the embedding table only B rows of it; the lm_head, or the tied
               embedding used as the head, whole) + the KV cache it attends over,
  KV bytes   = B * min(window, context) * 2 (k, v) * layers * Nkv * head_dim * 2 (bf16),
with context = the mean number of positions a timed eager/cuda step sees (prompt + warm-up +
(steps + 1) / 2), so bound tok/s = B * bandwidth / bytes/step, and each runtime's fraction of the
bound is its tok/s / bound tok/s. Ratios from the same run: cuda/transformers and cuda/eager at
each batch, and cuda batch 8 / batch 1.

Progress goes to stderr; a table (or with --json one JSON object) to stdout. Each size's model
is freed before the next. A runtime that fails at one batch is reported with its error; the exit
status is then 1 if it was eager or cuda. Bad arguments: one line on stderr, exit status 2.
Not a test: run it by hand on a GPU host, e.g.
    PYTHONPATH=. python3 bench/gpu_decode.py [--sizes 3b,15b] [--batches 1,8,32] [--json]
and on CPU as a smoke test (the cuda runtime runs there only under the Triton interpreter):
    TRITON_INTERPRET=1 PYTHONPATH=. python3 bench/gpu_decode.py --device cpu --sizes tiny --batches 1,2 --steps 2
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from sc2deploy.errors import UserError  # noqa: E402

RUNTIMES = ("eager", "transformers", "cuda")
WARMUP = 2  # untimed decode steps of eager and cuda before the timed ones
TRANSFORMERS_MAX_STEPS = 16
DTYPE = "bf16"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- arguments
def parse_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise UserError(f"--{what} is empty; give a comma-separated list")
    if len(set(items)) != len(items):
        raise UserError(f"--{what} {text!r} repeats an entry")
    return items


def parse_batches(text: str) -> list[int]:
    batches = []
    for item in parse_list(text, "batches"):
        try:
            batch = int(item)
        except ValueError:
            raise UserError(f"--batches: {item!r} is not an integer; e.g. --batches 1,8,32") from None
        if batch < 1:
            raise UserError(f"--batches: a batch of {batch} is impossible; each batch must be at least 1")
        batches.append(batch)
    return batches


def resolve_device(name: str, runtimes: list[str]) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device; use cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this machine has no CUDA device (or torch was built without CUDA); "
                        "run on a GPU host, or --device cpu with TRITON_INTERPRET=1 for a smoke test")
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"--device {name}: only cuda and cpu are supported")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if "cuda" in runtimes and device.type == "cpu":
        from sc2deploy.plugins.triton_kernel import INTERPRET

        if not INTERPRET:
            raise UserError(f"--device {device}: the cuda runtime runs on CPU only under the Triton interpreter; "
                            "set TRITON_INTERPRET=1 in the environment, or leave cuda out of --runtimes")
    return device


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="3b,15b", help="comma-separated presets (default 3b,15b)")
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES),
                        help=f"comma-separated subset of {','.join(RUNTIMES)} (default all)")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps of eager and cuda (default 32)")
    parser.add_argument("--transformers-steps", type=int, default=None,
                        help=f"decode steps timed for transformers (default min(--steps, {TRANSFORMERS_MAX_STEPS}))")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per row (default 128)")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a smoke test")
    parser.add_argument("--copy-gib", type=float, default=None,
                        help="size of the tensor copied to measure bandwidth (default 2 on a GPU, 0.25 on CPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> tuple[list, list[int], list[str], torch.device]:
    from sc2deploy.config import preset

    configs = [(name, preset(name)) for name in parse_list(args.sizes, "sizes")]  # UserError on unknown sizes
    batches = parse_batches(args.batches)
    runtimes = parse_list(args.runtimes, "runtimes")
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise UserError(f"--runtimes: unknown runtime {unknown[0]!r}; choose from {', '.join(RUNTIMES)}")
    runtimes = [r for r in RUNTIMES if r in runtimes]  # a fixed order
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: time at least one decode step")
    if args.transformers_steps is None:
        args.transformers_steps = min(args.steps, TRANSFORMERS_MAX_STEPS)
    if args.transformers_steps < 1:
        raise UserError(f"--transformers-steps {args.transformers_steps}: time at least one decode step")
    if args.prompt_len < 1:
        raise UserError(f"--prompt-len {args.prompt_len}: a prompt needs at least one token")
    for name, config in configs:
        longest = args.prompt_len + WARMUP + max(args.steps, args.transformers_steps) + 1
        if longest > config.max_position_embeddings:
            raise UserError(f"--prompt-len {args.prompt_len} plus the decode steps ({longest} tokens) exceed the "
                            f"{name} context of {config.max_position_embeddings}; shorten them")
    device = resolve_device(args.device, runtimes)
    if args.copy_gib is None:
        args.copy_gib = 2.0 if device.type == "cuda" else 0.25
    if args.copy_gib <= 0:
        raise UserError(f"--copy-gib {args.copy_gib}: the copied tensor needs a positive size")
    return configs, batches, runtimes, device


# ---------------------------------------------------------------- measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def copy_bandwidth(device: torch.device, gib: float, repeats: int = 5) -> dict:
    """Device-to-device copy bandwidth in bytes/s (read + write: 2 * bytes / time), best of `repeats`."""
    n = max(1, int(gib * 2**30) // 2)
    src = torch.ones(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    inner = 10 if device.type == "cuda" else 1  # copies between synchronisations: a GPU copy takes ~1 ms
    dst.copy_(src)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            dst.copy_(src)
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / inner)
    nbytes = n * 2
    del src, dst
    free_memory(device)
    return {"bytes_copied": nbytes, "repeats": repeats, "best_s": best, "bytes_per_s": 2 * nbytes / best}


def step_bytes(config, batch: int, context: float) -> dict:
    """Bytes one decode step of `batch` rows must read: weights (B rows of the embedding) + the KV it attends over."""
    from sc2deploy.config import dtype_bytes

    size = dtype_bytes(DTYPE)
    table = config.vocab_size * config.hidden_size * size
    weights = config.weight_bytes(DTYPE) + batch * config.hidden_size * size  # the head (tied or not) whole
    if not config.tie_word_embeddings:
        weights -= table  # the embedding table: only the B rows gathered
    kv = int(batch * min(config.window, context) * config.kv_bytes_per_token(DTYPE))
    return {"weights": weights, "kv": kv, "total": weights + kv}


def result(batch: int, steps: int, seconds: float, **extra) -> dict:
    return {"tok_s": batch * steps / seconds, "ms_per_step": 1e3 * seconds / steps, "steps": steps,
            "seconds": seconds, **extra}


def time_eager(model, prompts: torch.Tensor, steps: int, device: torch.device) -> tuple[dict, torch.Tensor]:
    """The reference model called directly, as selftest's eager_decode_part does; `steps` timed after WARMUP."""
    batch, length = prompts.shape
    cache = model.empty_cache(batch, model.config.cache_positions())
    ids = prompts.to(device)
    with torch.inference_mode():
        logits, cache = model(ids, torch.ones_like(ids), cache)
        first = logits[0, -1].float()
        token = logits[:, -1].argmax(-1, keepdim=True)
        del logits

        def step(token: torch.Tensor, length: int, cache: list) -> tuple[torch.Tensor, list]:
            mask = torch.ones((batch, length + 1), dtype=torch.int64, device=device)
            return model(token, mask, cache)

        for _ in range(WARMUP):
            logits, cache = step(token, length, cache)
            token = logits[:, -1].argmax(-1, keepdim=True)
            length += 1
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            logits, cache = step(token, length, cache)
            token = logits[:, -1].argmax(-1, keepdim=True)
            length += 1
        synchronize(device)
        seconds = time.perf_counter() - start
        finite = bool(torch.isfinite(logits).all())
    return result(batch, steps, seconds, finite=finite), first


def time_cuda(model, prompts: torch.Tensor, steps: int, device: torch.device) -> tuple[dict, torch.Tensor]:
    """CudaRuntime(max_batch=B): graphs captured and slots prefilled untimed, then `steps` decodes of all B slots."""
    from sc2deploy.runtime.cuda import CudaRuntime

    batch = prompts.shape[0]
    start = time.perf_counter()
    runtime = CudaRuntime(model=model, dtype=DTYPE, max_batch=batch, device=device)
    synchronize(device)
    setup = time.perf_counter() - start
    try:
        last = [runtime.prefill(slot, row) for slot, row in enumerate(prompts.tolist())]
        first = last[0].float().clone()
        tokens = torch.stack(last).argmax(-1).tolist()
        slots = list(range(batch))
        for _ in range(WARMUP):
            tokens = runtime.decode(slots, tokens).argmax(-1).tolist()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            logits = runtime.decode(slots, tokens)
            tokens = logits.argmax(-1).tolist()
        synchronize(device)
        seconds = time.perf_counter() - start
        finite = bool(torch.isfinite(logits).all())
        return result(batch, steps, seconds, finite=finite, setup_s=setup,
                      cuda_graphs=runtime.graphs), first
    finally:
        del runtime
        free_memory(device)


def build_transformers(model, config, device: torch.device):
    """transformers' Starcoder2ForCausalLM holding `model`'s own weight tensors (no second copy)."""
    import transformers

    hf_config = transformers.Starcoder2Config(**config.to_hf_dict())
    hf_config.bos_token_id, hf_config.eos_token_id, hf_config.pad_token_id = (
        config.bos_token_id, config.eos_token_id, config.eos_token_id)
    with torch.device("meta"):
        hf = transformers.Starcoder2ForCausalLM(hf_config)
    missing, unexpected = hf.load_state_dict(model.state_dict(), assign=True, strict=False)
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {sorted(set(missing) - allowed)}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    # The rotary buffers (not in the state dict) are still on the meta device: rebuild them on the device.
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_config).to(device)
    meta = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.device.type == "meta"]
    if meta:
        raise RuntimeError(f"tensors left on the meta device: {meta[:3]}")
    return hf.eval()


def time_transformers(hf, prompts: torch.Tensor, steps: int, device: torch.device) -> dict:
    """Decode of `steps` tokens = generate(steps + 1 new) (best of 2) - generate(1 new) (best of 3), after a warm-up."""
    ids = prompts.to(device)
    mask = torch.ones_like(ids)

    def generate(n: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                          eos_token_id=None, pad_token_id=0)
        synchronize(device)
        seconds = time.perf_counter() - start
        if out.shape[1] != ids.shape[1] + n:
            raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens, not {n}")
        return seconds

    with torch.inference_mode():
        generate(2)  # warm-up
        one = min(generate(1) for _ in range(3))
        every = min(generate(steps + 1) for _ in range(2))
        for _ in range(2):  # noise (a loaded CPU) can swamp a short decode: measure again
            if every > one:
                break
            one = min(one, generate(1))
            every = min(every, generate(steps + 1))
    if every <= one:
        raise RuntimeError(f"generate({steps + 1}) took {every:.4f} s, no longer than generate(1) ({one:.4f} s)")
    return result(ids.shape[0], steps, every - one, generate_1_s=one, generate_n_s=every)


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:500]


def measure_size(name: str, config, batches: list[int], runtimes: list[str], args, device: torch.device,
                 bandwidth: float) -> dict:
    from sc2deploy.checkpoint import random_model

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log(f"[{name}] random {DTYPE} weights on {device} ...")
    start = time.perf_counter()
    model = random_model(config, DTYPE, device=device, seed=0)
    synchronize(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out: dict = {"parameters": config.num_parameters, "weight_bytes": weight_bytes,
                 "tie_word_embeddings": config.tie_word_embeddings, "window": config.window,
                 "load_s": time.perf_counter() - start}
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, config.vocab_size, (max(batches), args.prompt_len), generator=gen)
    context = args.prompt_len + WARMUP + (args.steps + 1) / 2
    out["bound"] = {}
    for b in batches:
        nbytes = step_bytes(config, b, context)
        out["bound"][str(b)] = {"bytes_per_step": nbytes["total"], "weight_bytes_per_step": nbytes["weights"],
                                "kv_bytes_per_step": nbytes["kv"], "context": context,
                                "tok_s": b * bandwidth / nbytes["total"]}
    results: dict[str, dict] = {r: {} for r in runtimes}
    first_logits: dict[str, torch.Tensor] = {}

    def run(runtime: str, batch: int, measure) -> None:
        log(f"[{name}] {runtime} batch {batch} ...")
        try:
            got, first = measure()
        except Exception as e:  # noqa: BLE001 -- reported in the output, the other runs go on
            traceback.print_exc(file=sys.stderr)
            results[runtime][str(batch)] = {"error": error_text(e)}
            return
        finally:
            free_memory(device)  # the caches of this run
        if first is not None and batch == batches[0]:
            first_logits[runtime] = first.float().cpu()
        got["fraction_of_bound"] = got["tok_s"] / out["bound"][str(batch)]["tok_s"]
        results[runtime][str(batch)] = got
        log(f"[{name}] {runtime} batch {batch}: {got['tok_s']:.1f} tok/s, {got['ms_per_step']:.2f} ms/step, "
            f"{got['fraction_of_bound']:.3f} of the bound")

    if "eager" in runtimes:
        for b in batches:
            run("eager", b, lambda b=b: time_eager(model, prompts[:b], args.steps, device))
    if "transformers" in runtimes:
        try:
            import transformers

            out["transformers_version"] = transformers.__version__
            hf = build_transformers(model, config, device)
            out["transformers_attn_implementation"] = hf.config._attn_implementation
        except Exception as e:  # noqa: BLE001 -- an anchor, not the product
            traceback.print_exc(file=sys.stderr)
            results["transformers"] = {"error": error_text(e)}
        else:
            def hf_measure(b: int):
                got = time_transformers(hf, prompts[:b], args.transformers_steps, device)
                with torch.inference_mode():  # the same weights? its prefill logits against eager's
                    first = hf(input_ids=prompts[:1].to(device)).logits[0, -1] if b == batches[0] else None
                return got, first

            for b in batches:
                run("transformers", b, lambda b=b: hf_measure(b))
            del hf
        free_memory(device)
    if "cuda" in runtimes:
        for b in batches:
            run("cuda", b, lambda b=b: time_cuda(model, prompts[:b], args.steps, device))
    out["runtimes"] = results
    if "eager" in first_logits:
        out["max_abs_logit_diff_vs_eager"] = {r: float((t - first_logits["eager"]).abs().max())
                                              for r, t in first_logits.items() if r != "eager"}
    out["ratios"] = ratios(results, batches)
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model
    free_memory(device)
    return out


def ratios(results: dict, batches: list[int]) -> dict:
    tok: dict[tuple[str, int], float] = {
        (runtime, b): got[str(b)]["tok_s"] for runtime, got in results.items() for b in batches
        if "tok_s" in got.get(str(b), {})}
    out: dict = {}
    for other in ("transformers", "eager"):
        pairs = {str(b): tok["cuda", b] / tok[other, b] for b in batches if ("cuda", b) in tok and (other, b) in tok}
        if pairs:
            out[f"cuda_over_{other}"] = pairs
    if ("cuda", 8) in tok and ("cuda", 1) in tok:
        out["cuda_batch8_over_batch1"] = tok["cuda", 8] / tok["cuda", 1]
    return out


def machine(device: torch.device) -> dict:
    import triton

    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    out = {"device": str(device), "torch": torch.__version__, "triton": triton.__version__,
           "transformers": hf_version, "python": sys.version.split()[0]}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, sm_count=props.multi_processor_count,
                   cuda=torch.version.cuda)
    else:
        out["gpu"] = None
    return out


# ---------------------------------------------------------------- output
def print_table(report: dict, batches: list[int], runtimes: list[str]) -> None:
    s = report["settings"]
    m = report["machine"]
    print(f"{m.get('gpu') or m['device']}: torch {m['torch']}, triton {m['triton']}, transformers {m['transformers']}")
    print(f"copy bandwidth {report['copy_bandwidth_gb_s']:.0f} GB/s (read + write); prompt {s['prompt_len']} tokens, "
          f"{s['steps']} decode steps timed ({s['transformers_steps']} for transformers), {DTYPE}")
    for name, r in report["sizes"].items():
        peak = f", peak {r['peak_gib']:.1f} GiB" if "peak_gib" in r else ""
        print(f"\n{name}: {r['parameters'] / 1e9:.2f}B parameters, {r['weight_bytes'] / 1e9:.2f} GB of weights{peak}")
        print(f"{'batch':<6}{'runtime':<14}{'tok/s':>10}{'ms/step':>10}{'of bound':>10}")
        for b in batches:
            bound = r["bound"][str(b)]
            for runtime in runtimes:
                got = r["runtimes"][runtime]
                got = got if "error" in got else got.get(str(b), {"error": "not run"})
                if "error" in got:
                    print(f"{b:<6}{runtime:<14}  error: {got['error'][:120]}")
                    continue
                print(f"{b:<6}{runtime:<14}{got['tok_s']:>10.1f}{got['ms_per_step']:>10.2f}"
                      f"{got['fraction_of_bound']:>10.3f}")
            print(f"{b:<6}{'bound':<14}{bound['tok_s']:>10.1f}{1e3 * b / bound['tok_s']:>10.2f}"
                  f"{'':>10}  ({bound['bytes_per_step'] / 1e9:.3f} GB/step)")
        ratio = r["ratios"]
        for key in ("cuda_over_transformers", "cuda_over_eager"):
            if key in ratio:
                print(f"{key.replace('_', ' ')}: " + ", ".join(f"batch {b} {x:.2f}x" for b, x in ratio[key].items()))
        if "cuda_batch8_over_batch1" in ratio:
            print(f"cuda batch 8 / batch 1: {ratio['cuda_batch8_over_batch1']:.2f}x")
        if r.get("max_abs_logit_diff_vs_eager"):
            print("prefill logits vs eager (max abs diff): "
                  + ", ".join(f"{k} {v:.3g}" for k, v in r["max_abs_logit_diff_vs_eager"].items()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        configs, batches, runtimes, device = check_args(args)
    except UserError as e:
        print(f"gpu_decode: error: {e}", file=sys.stderr)
        return e.exit_code
    started = time.perf_counter()
    log(f"copy bandwidth on {device} ({args.copy_gib:g} GiB) ...")
    copy = copy_bandwidth(device, args.copy_gib)
    log(f"copy bandwidth {copy['bytes_per_s'] / 1e9:.1f} GB/s")
    report: dict = {
        "machine": machine(device),
        "settings": {"dtype": DTYPE, "prompt_len": args.prompt_len, "steps": args.steps,
                     "transformers_steps": args.transformers_steps, "warmup_steps": WARMUP,
                     "batches": batches, "runtimes": runtimes},
        "copy_bandwidth_gb_s": copy["bytes_per_s"] / 1e9,
        "copy": copy,
        "sizes": {},
    }
    for name, config in configs:
        report["sizes"][name] = measure_size(name, config, batches, runtimes, args, device, copy["bytes_per_s"])
    report["total_s"] = time.perf_counter() - started
    log(f"done in {report['total_s']:.0f} s")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report, batches, runtimes)
    failed = [f"{name} {r} {b}" for name, size in report["sizes"].items() for r in ("eager", "cuda")
              for b, got in size["runtimes"].get(r, {}).items() if "error" in got]
    if failed:
        log(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
