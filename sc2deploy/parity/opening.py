"""Opening what to compare: the runtime under test (artifact, engine or checkpoint) and the reference on the
weights it was made from (the manifest's source, verified against the sha256 recorded at export); `check`."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from sc2deploy.config import SHAPE_FIELDS, Config, config_differences
from sc2deploy.contract import MANIFEST, Manifest, read_manifest
from sc2deploy.errors import UserError
from sc2deploy.parity.compare import FIDELITY, quantized_compute, tolerances_for
from sc2deploy.parity.dequantized import DequantizedSource
from sc2deploy.parity.reference import ChunkedReference
from sc2deploy.parity.report import Report
from sc2deploy.parity.running import run_suite
from sc2deploy.parity.suite import DECODE_STEPS, build_suite, load_prompts
from sc2deploy.runtime.base import Runtime
from sc2deploy.runtime.eager import EagerRuntime
from sc2deploy.tasks import TEXT_GENERATION
from sc2deploy.tokenizer import Tokenizer


BEHAVIOUR_FIELDS = ("sliding_window", "rope_theta", "norm_epsilon", "max_position_embeddings", "hidden_act")


def manifest_source(manifest: Manifest, folder: Path):
    """The weights an artifact was exported from, as its manifest's "source" records them."""
    from sc2deploy.checkpoint import CheckpointSource, RandomSource

    where = str(folder / MANIFEST)
    config = Config.from_hf_dict(manifest.config, source=where)
    source = manifest.source
    kind = source.get("kind")
    if kind == "checkpoint" and isinstance(source.get("path"), str):
        path = Path(source["path"])
        if not path.is_dir():
            raise UserError(f"{where} says the artifact was exported from checkpoint {path}, which is not here; "
                            "pass that checkpoint (or a copy) with --checkpoint DIR")
        return CheckpointSource(path)
    if kind == "random" and isinstance(source.get("seed"), int):
        return RandomSource(config, source["seed"])
    raise UserError(f"{where} records neither a source checkpoint nor a random seed (source: {source or None}); "
                    "pass the checkpoint it was exported from with --checkpoint DIR")


def recorded_hashes(manifest: Manifest | None) -> dict[str, str] | None:
    """The sha256 of the source checkpoint's weight files that the manifest records (export records them)."""
    source = manifest.source if manifest is not None else None
    hashes = source.get("sha256") if isinstance(source, dict) and source.get("kind") == "checkpoint" else None
    if isinstance(hashes, dict) and hashes and all(isinstance(v, str) for v in hashes.values()):
        return hashes
    return None


def verify_source(source, manifest: Manifest, folder: Path, given: bool) -> str | None:
    """Check that the reference checkpoint's weight files are those `folder` was made from (the sha256 its
    manifest records), so that a checkpoint changed since the export is reported as such, not as a runtime that
    disagrees with it. Returns a note for the report; raises a UserError naming the file that differs."""
    hashes = recorded_hashes(manifest)
    if hashes is None:
        return f"{MANIFEST} records no sha256 of the source checkpoint: the reference weights were not verified"
    where = source.folder
    found = source.file_hashes()
    if given:
        if found != hashes:
            changed = sorted(set(found) ^ set(hashes)) or sorted(n for n in found if found[n] != hashes[n])
            raise UserError(f"--checkpoint {where} is not the checkpoint {folder} was made from ({changed[0]} "
                            f"differs from the sha256 in its {MANIFEST}); pass that one, or re-export from this "
                            f"one: sc2deploy export --checkpoint {where} --out {folder} --force")
        return f"reference checkpoint {where} matches the sha256 {MANIFEST} records"
    missing, added = sorted(set(hashes) - set(found)), sorted(set(found) - set(hashes))
    changed = sorted(n for n in set(found) & set(hashes) if found[n] != hashes[n])
    if missing or added or changed:
        what = (f"{changed[0]} differs from the sha256 in {folder / MANIFEST}" if changed else
                f"{missing[0]} is gone" if missing else f"it has a new weight file {added[0]}")
        raise UserError(f"the checkpoint {where} changed since {folder} was exported from it ({what}), so the "
                        f"reference would not be the exported weights; re-export: sc2deploy export --checkpoint "
                        f"{where} --out {folder} --force (with the same --dtype and --target), then run parity again")
    return f"source checkpoint {where} matches the sha256 recorded at export"


def open_tested(backend: str, folder: Path, max_batch: int, options: dict) -> Runtime:
    """The ort or trt runtime on `folder`. An artifact's files are all rehashed: a hash cached from an earlier
    open trusts their mtimes, and parity is where a file changed behind them must be caught."""
    if backend == "ort":
        from sc2deploy.runtime.onnxruntime import OrtRuntime
        from sc2deploy.runtime.ort_artifact import load_ort_artifact

        return OrtRuntime(load_ort_artifact(folder, trust_cache=False), max_batch=max_batch, **options)
    from sc2deploy.runtime.tensorrt import TrtRuntime
    from sc2deploy.runtime.trt_engine import load_trt_engine

    return TrtRuntime(load_trt_engine(folder), max_batch=max_batch, **options)


def check(folder: str | Path, backend: str = "ort", checkpoint: str | Path | None = None,
          prompts: str | Path | None = None, decode_steps: int = DECODE_STEPS, atol: float | None = None,
          rtol: float | None = None, kl: float | None = None, threads: int | None = None,
          device: torch.device | str | None = None, dtype: str = "bf16",
          progress: Callable[[str], None] | None = None, save_results: str | Path | None = None) -> Report:
    """`sc2deploy parity`: open the reference and the runtime for `folder`, run the suite, return the report.

    `folder` is the artifact (ort), the engine folder (trt) or a checkpoint folder (eager: a second set of
    weights checked against --checkpoint, or against itself). The reference is fp32 eager on the weights of
    `checkpoint`, else those the folder's manifest names (source checkpoint or random seed), on the CPU.
    cuda: the GPU runtime on the checkpoint folder, in `dtype`. `device`: where an eager or cuda runtime under
    test runs (default: cpu for eager, cuda for cuda).
    """
    from sc2deploy.checkpoint import CheckpointSource
    from sc2deploy.runtime import BACKENDS, open_runtime

    def stage(message: str) -> None:
        if progress:
            progress(message)

    folder = Path(folder)
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not folder.is_dir():
        made_by = {"ort": "`sc2deploy export --target ort`", "trt": "`sc2deploy build`", "eager": "a checkpoint",
                   "cuda": "a checkpoint"}
        raise UserError(f"{folder} is not a folder; give the {backend} folder to check (made by {made_by[backend]})")
    notes = []
    if backend in ("eager", "cuda"):
        tested_source = CheckpointSource(folder)
        source = CheckpointSource(checkpoint) if checkpoint else tested_source
    else:
        manifest = read_manifest(folder, None) if (folder / MANIFEST).is_file() else None
        if manifest is None and (folder / "config.json").is_file():
            fix = (f"export it first: sc2deploy export --checkpoint {folder} --out ART, then sc2deploy parity ART"
                   if backend == "ort" else
                   f"export and build it first: sc2deploy export --checkpoint {folder} --target trt --out ART, "
                   f"sc2deploy build ART --out ENGINE, then sc2deploy parity ENGINE --backend trt")
            raise UserError(f"{folder} is a Hugging Face checkpoint, not an export artifact; {fix} (or check a "
                            f"runtime on the checkpoint itself: --backend eager or cuda)")
        if manifest is None:
            writer = "`sc2deploy export`" if backend == "ort" else "`sc2deploy build`"
            raise UserError(f"{folder} has no {MANIFEST}, so it is not a finished {backend} folder; give the folder "
                            f"{writer} wrote")
        source = CheckpointSource(checkpoint) if checkpoint else manifest_source(manifest, folder)
        if isinstance(source, CheckpointSource) and recorded_hashes(manifest):
            stage(f"parity: checking the sha256 of {source.folder}'s weights against {MANIFEST} ...")
        note = verify_source(source, manifest, folder, given=bool(checkpoint)) \
            if isinstance(source, CheckpointSource) else None
        if note:
            notes.append(note)
        if manifest.task != TEXT_GENERATION:  # a classifier's or base model's artifact: parity/heads.py
            from sc2deploy.parity.heads import check_heads

            if backend != "ort":
                raise UserError(f"{folder} is a {manifest.task} artifact, which runs in ONNX Runtime only; check it "
                                "with --backend ort (the default)")
            if threads:
                torch.set_num_threads(threads)
            report = check_heads(folder, source, prompts, lambda d: tolerances_for(d, atol, rtol, kl), threads,
                                 progress, save_results)
            report.notes += notes
            return report
    if threads:
        torch.set_num_threads(threads)
    tokenizer = Tokenizer.load(checkpoint if checkpoint else folder)
    extra = load_prompts(prompts, tokenizer, source.config.vocab_size) if prompts else ()
    cases = build_suite(source.config, tokenizer, decode_steps, extra)
    slots = max(len(c.prompts) for c in cases)

    options: dict = {"threads": threads} if threads and backend not in ("eager", "cuda") else {}
    runtime: Runtime  # opened first: it is the part most likely to refuse
    stage(f"parity: loading the {backend} runtime under test ({folder}) ...")
    if backend == "eager":
        runtime = EagerRuntime(tested_source, dtype="fp32", max_batch=slots, device=device or "cpu")
    elif backend == "cuda":
        runtime = open_runtime("cuda", source=tested_source, dtype=dtype, max_batch=slots, device=device)
    else:
        try:
            runtime = open_tested(backend, folder, slots, options)
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as e:  # e.g. the backend's library is missing or refuses the model
            raise UserError(f"cannot open {folder} with the {backend} runtime: {type(e).__name__}: {e}") from e
    shape = config_differences(source.config, runtime.config, SHAPE_FIELDS)
    if shape:
        raise UserError(f"{folder} holds a different model than the reference ({source.description}): "
                        f"{', '.join(shape)}; pass the checkpoint it was made from with --checkpoint DIR")
    quant = runtime.quantization
    compute = quantized_compute(quant, runtime.dtype) if quant else runtime.dtype
    expected = DequantizedSource(source, quant, runtime.dtype) if quant else source
    stage(f"parity: loading the eager fp32 reference ({expected.description}) ...")
    reference = ChunkedReference(expected, max_batch=slots)
    baseline = ChunkedReference(source, max_batch=slots) if quant else None
    report = run_suite(reference, runtime, cases, tolerances_for(compute, atol, rtol, kl), progress, save_results,
                       baseline=baseline, fidelity=FIDELITY[quant.name] if quant else None)
    report.reference = f"eager fp32 on {expected.description}"
    report.notes += notes
    if quant:
        report.notes.append(f"{quant.name} weights: logits compared with the model on the same weights quantized "
                            f"and dequantized ({compute} tolerances); fidelity against the unquantized model: "
                            "KL, top-1, top-5 per case")
    behaviour = config_differences(source.config, runtime.config, BEHAVIOUR_FIELDS)
    if behaviour:
        report.notes.append(f"the {backend} model's config differs from the reference: {', '.join(behaviour)}")
    return report
