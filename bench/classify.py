"""Sequence classification throughput: sc2deploy's ONNX Runtime head artifact vs transformers' (and the eager model).

One set of weights (the `bench` preset, ~111M parameters, random, with a two-label
Starcoder2ForSequenceClassification head) is written once as a Hugging Face checkpoint and exported; transformers
loads that checkpoint. Every runtime classifies the same batch (default 8 prompts of 512 tokens) in one call, in
one process, with the same thread count; repeats interleave the runtimes (a burst of load hits all of them) and
each keeps its best. The logits of each are compared with transformers' in the same run (max |difference|, and
that over the largest |logit|).

Optional row (--dynamic-int8): the same ONNX graph through onnxruntime.quantization.quantize_dynamic (int8
weights per tensor, int8 activations quantized at run time: MatMulInteger). Not an sc2deploy artifact and not
checked by `sc2deploy parity`; shown for what ONNX Runtime's int8 kernels give on this CPU, with its logit error.
Not a test: run it by hand, e.g.
    python bench/classify.py [--tokens 512] [--batch 8] [--threads 2] [--repeats 3] [--dynamic-int8] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def batch_of(batch: int, tokens: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    gen = torch.Generator().manual_seed(batch * 1000 + tokens)
    ids = torch.randint(1, vocab, (batch, tokens), generator=gen).numpy()  # never pad_token_id 0
    return ids, np.ones_like(ids)


class Transformers:
    name = "transformers"

    def __init__(self, folder: Path):
        from transformers import Starcoder2ForSequenceClassification

        self.model = Starcoder2ForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


class Plain:
    """A head runtime's forward, or a bare ONNX Runtime session on a graph file."""

    def __init__(self, name: str, forward):
        self.name, self.forward = name, forward

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.forward(ids, mask)


def dynamic_int8(artifact: Path, out: Path, threads: int) -> Plain:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(artifact / "model.onnx"), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     use_external_data_format=True,
                     extra_options={"MatMulConstBOnly": True, "DefaultTensorType": 1})  # 1: float (contrib ops)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = threads, 3
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    return Plain("ort-dynamic-int8", lambda ids, mask: session.run(["logits"], {"input_ids": ids,
                                                                               "attention_mask": mask})[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="bench")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per call (default 8)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-eager", dest="eager", action="store_false", help="leave out the eager reference")
    parser.add_argument("--dynamic-int8", action="store_true", help="also time ORT's quantize_dynamic of the graph")
    parser.add_argument("--dir", default=None, help="where the checkpoint and artifact go (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from sc2deploy.checkpoint import CheckpointSource, RandomSource, write_checkpoint
    from sc2deploy.config import preset
    from sc2deploy.export import export_artifact
    from sc2deploy.runtime.heads import EagerHeads
    from sc2deploy.runtime.ort_heads import OrtHeads
    from sc2deploy.tasks import SEQUENCE_CLASSIFICATION, Head

    config = preset(args.size).replace(head=Head(SEQUENCE_CLASSIFICATION, ("LABEL_0", "LABEL_1"), pad_token_id=0))
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="sc2-classify-bench-", dir=args.dir) as tmp:
        tmp = Path(tmp)
        log("writing the checkpoint and exporting it ...")
        write_checkpoint(RandomSource(config), tmp / "checkpoint", "fp32")
        export_artifact(CheckpointSource(tmp / "checkpoint"), tmp / "artifact", "fp32", "ort")
        ort_heads = OrtHeads(tmp / "artifact", threads=args.threads)
        runtimes = [Transformers(tmp / "checkpoint"), Plain("ort", ort_heads.forward)]
        if args.eager:
            runtimes.append(Plain("eager", EagerHeads(CheckpointSource(tmp / "checkpoint")).forward))
        if args.dynamic_int8:
            log("quantizing the graph with onnxruntime.quantization.quantize_dynamic ...")
            runtimes.append(dynamic_int8(tmp / "artifact", tmp / "dynamic-int8.onnx", args.threads))
        ids, mask = batch_of(args.batch, args.tokens, config.vocab_size)
        best: dict[str, float] = {}
        logits: dict[str, np.ndarray] = {}
        loads = [os.getloadavg()]
        for repeat in range(args.repeats + 1):  # the first round warms up and is not timed
            log(f"repeat {repeat}/{args.repeats}{' (warm-up)' if repeat == 0 else ''} ...")
            for runtime in runtimes:
                # ONNX Runtime's threads need the cores that torch's OpenMP workers spin on after each op.
                torch.set_num_threads(1 if runtime.name.startswith("ort") else args.threads)
                start = time.perf_counter()
                logits[runtime.name] = runtime(ids, mask)
                seconds = time.perf_counter() - start
                if repeat:
                    best[runtime.name] = min(best.get(runtime.name, float("inf")), seconds)
            loads.append(os.getloadavg())

    reference = logits["transformers"]
    results = {name: {"sequences_s": args.batch / s, "tokens_s": args.batch * args.tokens / s,
                      "speedup": best["transformers"] / s,
                      "max_abs_logit_diff": float(np.abs(logits[name] - reference).max()),
                      "max_rel_logit_diff": float(np.abs(logits[name] - reference).max() / np.abs(reference).max())}
               for name, s in best.items()}
    report = {"machine": {"cpus": os.cpu_count(), "threads": args.threads, "load_avg_1min": [x[0] for x in loads]},
              "model": {"size": args.size, "parameters": config.num_parameters, "task": config.head.task},
              "batch": args.batch, "tokens": args.tokens, "repeats": args.repeats, "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"model {args.size} sequence classification: {config.num_parameters / 1e6:.0f}M parameters; batch "
          f"{args.batch} x {args.tokens} tokens; {args.threads} threads; best of {args.repeats}; load avg "
          f"{min(x[0] for x in loads):.1f}-{max(x[0] for x in loads):.1f}")
    print(f"{'runtime':<18}{'sequences/s':>12}{'tokens/s':>10}{'vs transformers':>17}{'max |logit diff|':>18}"
          f"{'/ max |logit|':>15}")
    for name, r in results.items():
        print(f"{name:<18}{r['sequences_s']:>12.2f}{r['tokens_s']:>10.0f}{r['speedup']:>16.2f}x"
              f"{r['max_abs_logit_diff']:>18.1e}{r['max_rel_logit_diff']:>15.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
