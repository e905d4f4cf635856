"""What an export can be: the dtypes each target accepts, and what a target needs of the model."""
from __future__ import annotations

from sc2deploy.config import Config
from sc2deploy.contract import DTYPE_BYTES, TARGETS
from sc2deploy.errors import UserError
from sc2deploy.quantization import QuantScheme

TARGET_DTYPES = {"ort": ("fp32", "fp16"), "trt": ("fp32", "fp16", "bf16")}


def check_target_dtype(target: str, dtype: str) -> None:
    """Refuse an unknown target or dtype, or a combination that cannot run, naming the reason and the fix."""
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)} "
                        "(ort: ONNX Runtime GroupQueryAttention, trt: the TensorRT RopeCache and SlidingWindowGQA plugins)")
    if dtype not in DTYPE_BYTES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(TARGET_DTYPES[target])} for --target {target}")
    if dtype not in TARGET_DTYPES[target]:
        raise UserError("ONNX Runtime has no CPU kernel for bf16 GroupQueryAttention, so --target ort exports fp32 "
                        "or fp16; bf16 is for --target trt")


def check_target(target: str, dtype: str, config: Config, quant: QuantScheme | None = None) -> None:
    """check_target_dtype, plus what the target (and the quantization) needs of the model's shape."""
    check_target_dtype(target, dtype)
    if quant is not None:
        if target != "ort":
            raise UserError(f"--quant {quant.name} is for --target ort (ONNX Runtime's MatMulNBits); TensorRT engines "
                            "are built from an unquantized --target trt export")
        for k, what in ((config.hidden_size, "the attention and c_fc weights (hidden_size)"),
                        (config.intermediate_size, "the c_proj weights (intermediate_size)")):
            quant.check_dimension(k, what)
    if target == "ort" and config.head_dim % 16:
        raise UserError(f"head_dim={config.head_dim}: ONNX Runtime's GroupQueryAttention needs a head size that is a "
                        "multiple of 16 (StarCoder2 uses 128); use --target trt for this config")
