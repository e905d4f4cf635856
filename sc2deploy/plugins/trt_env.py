"""Is this a machine that can build and run TensorRT engines? One place answers, with the fix.

Every TensorRT path (`sc2deploy build`, `--backend trt`, `selftest --gpu`) calls
`require_tensorrt()` / `require_cuda()` first, so a machine without TensorRT or without a GPU
gets a UserError (exit 2) that says what to install, never an ImportError traceback.
Nothing here imports tensorrt at module import time.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from sc2deploy.errors import UserError

GPU_IMAGE = "docker/Dockerfile.gpu"
INSTALL_HINT = (
    f"build and run engines in the GPU image ({GPU_IMAGE}, NVIDIA's TensorRT container), "
    "or on a CUDA host `pip install 'sc2deploy[trt]'` (TensorRT >= 10.9, triton, and a CUDA build of torch)"
)
MIN_TENSORRT = (10, 9)


def version_tuple(version: str) -> tuple[int, ...]:
    """'10.13.0.35' -> (10, 13, 0, 35); non-numeric parts end the tuple."""
    parts: list[int] = []
    for piece in version.split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) != len(piece):
            break
    return tuple(parts)


def _import(name: str) -> ModuleType:
    return importlib.import_module(name)


def require_tensorrt(what: str = "this command") -> ModuleType:
    """The `tensorrt` module, or a UserError naming what to install."""
    try:
        trt = _import("tensorrt")
        if getattr(trt, "__file__", None) is None and not hasattr(trt, "__version__"):
            # A folder without __init__.py imports as a namespace package: tensorrt-stubs' .pyi files.
            raise UserError(f"TensorRT is not installed (only its type stubs, tensorrt-stubs, are); {what} needs "
                            f"it: {INSTALL_HINT}")
        version = str(trt.__version__)
    except UserError:
        raise
    except ImportError as e:
        raise UserError(f"TensorRT is not installed ({what} needs it; import failed: {e}): {INSTALL_HINT}") from None
    except Exception as e:  # a stub package, a broken wheel, missing libnvinfer
        raise UserError(f"TensorRT cannot be loaded ({type(e).__name__}: {e}); {what} needs it: {INSTALL_HINT}") from None
    if version_tuple(version)[:2] < MIN_TENSORRT:
        raise UserError(f"TensorRT {version} is too old: {what} needs TensorRT >= "
                        f"{'.'.join(map(str, MIN_TENSORRT))} (tensorrt.plugin aot_impl); {INSTALL_HINT}")
    return trt


def require_tensorrt_plugin(what: str = "this command") -> ModuleType:
    """`tensorrt.plugin` (the quickly deployable plugin API), after `require_tensorrt`."""
    require_tensorrt(what)
    try:
        return _import("tensorrt.plugin")
    except Exception as e:
        raise UserError(f"tensorrt.plugin cannot be imported ({type(e).__name__}: {e}); {what} needs "
                        f"TensorRT >= 10.9 with its Python plugin API: {INSTALL_HINT}") from None


def require_triton(what: str = "this command") -> ModuleType:
    try:
        return _import("triton")
    except Exception as e:
        raise UserError(f"triton is not installed ({type(e).__name__}: {e}); {what} compiles the sliding-window "
                        f"GQA kernel with it: {INSTALL_HINT}") from None


def require_cuda(what: str = "this command") -> Any:
    """torch with a visible CUDA device, or a UserError."""
    import torch

    if not torch.cuda.is_available():
        cuda = torch.version.cuda
        reason = ("this torch build has no CUDA support (a CPU wheel)" if cuda is None
                  else f"torch (CUDA {cuda}) sees no GPU")
        raise UserError(f"{what} needs an NVIDIA GPU, but {reason}: {INSTALL_HINT}")
    return torch


def gpu_identity(device: int = 0) -> dict[str, Any]:
    """Name and compute capability of a CUDA device (torch must see it)."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


def tensorrt_available() -> bool:
    """True when `tensorrt` imports (never raises)."""
    try:
        require_tensorrt()
    except UserError:
        return False
    return True
