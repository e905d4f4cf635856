"""export_artifact: a TensorSource -> an artifact folder (model.onnx + external data, genai files, manifest)."""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from sc2deploy.checkpoint import CheckpointSource, RandomSource, TensorSource
from sc2deploy.config import PRESETS
from sc2deploy.contract import DATA_FILE, MODEL_FILE, TOKENIZER_FILE, attention_description
from sc2deploy.export.targets import check_target
from sc2deploy.quantization import QuantScheme
from sc2deploy.staging import check_destination, staging_folder
from sc2deploy.tasks import TEXT_GENERATION


def export_artifact(source: TensorSource, out: str | Path, dtype: str = "fp32", target: str = "ort", *,
                    quant: QuantScheme | None = None, force: bool = False,
                    progress: Callable[[int], None] | None = None,
                    on_total: Callable[[int], None] | None = None, check: bool = True) -> Path:
    """Export the reference model with `source`'s weights to the folder `out`; returns `out`.

    `quant`: block-quantize every linear layer and the embedding (ort only; sc2deploy.quantization).
    `on_total(n)` is called once the number of weight bytes `progress` will report is known.
    `check` runs onnx.checker (full_check) on the written model before the folder is renamed into place.
    """
    import onnx

    from sc2deploy.export.genai import write_genai_files
    from sc2deploy.export.graph import IR_VERSION, OPSET, trace_model
    from sc2deploy.export.heads import check_head_export, trace_head_model
    from sc2deploy.export.manifest import write_manifest
    from sc2deploy.export.rewrite import finish_graph
    from sc2deploy.export.weights import save_model, weights_bytes

    config = source.config  # validated when the source was made, as every runtime validates the manifest's copy
    check_head_export(config, target, quant)
    check_target(target, dtype, config, quant)
    causal = config.head.task == TEXT_GENERATION
    tokenizer_json = _tokenizer_json(source)
    out = Path(out)
    check_destination(out, force)  # fail before the slow part
    traced = trace_model(config, dtype, target) if causal else trace_head_model(config, dtype)
    graph = finish_graph(traced, config, target, dtype, quant)
    if on_total:
        on_total(weights_bytes(graph))
    with staging_folder(out, force) as tmp:
        data_sha256 = save_model(graph, source, tmp / MODEL_FILE, progress)
        if check:
            onnx.checker.check_model(str(tmp / MODEL_FILE), full_check=True)
        if target == "ort" and causal:
            write_genai_files(tmp, config, MODEL_FILE)
        shutil.copyfile(tokenizer_json, tmp / TOKENIZER_FILE)
        g = graph.model.graph
        details = {
            **({} if causal else {"task": config.head.task}),  # the labels are config.json's id2label
            "target": target,
            "source": source_info(source),
            "graph": {
                "file": MODEL_FILE, "external_data": DATA_FILE, "opset": OPSET, "ir_version": IR_VERSION,
                "attention": attention_description(target, config.windowed and causal),
                "sliding_window_cache": config.windowed and target == "ort" and causal,
                "quantization": quant.to_manifest() if quant else None,
                "inputs": [v.name for v in g.inputs], "outputs": [v.name for v in g.outputs],
            },
        }
        write_manifest(tmp, config.to_hf_dict(), dtype, details, known_sha256={DATA_FILE: data_sha256})
    return out


def source_info(source: TensorSource) -> dict:
    if isinstance(source, CheckpointSource):
        return {"kind": "checkpoint", "path": str(source.folder.resolve()), "sha256": source.file_hashes()}
    if isinstance(source, RandomSource):
        preset = next((name for name, c in PRESETS.items() if c == source.config), None)
        return {"kind": "random", "seed": source.seed, "preset": preset}
    return {"kind": type(source).__name__, "description": source.description}


def _tokenizer_json(source: TensorSource) -> Path:
    """The tokenizer.json the artifact ships: the checkpoint's own, else the packaged one. The checkpoint's is
    loaded here exactly as `generate --checkpoint` loads it, so one that the artifact's users (generate, serve,
    parity: Tokenizer.load) would refuse fails the export instead."""
    from sc2deploy.tokenizer import Tokenizer, packaged_tokenizer_path

    if isinstance(source, CheckpointSource):
        Tokenizer.load(source.folder)
        if (source.folder / TOKENIZER_FILE).is_file():
            return source.folder / TOKENIZER_FILE
    return packaged_tokenizer_path()
