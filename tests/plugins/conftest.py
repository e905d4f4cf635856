"""Run the Triton kernels on CPU through Triton's interpreter.

TRITON_INTERPRET is read by `@triton.jit` when sc2deploy.plugins.triton_kernel is imported
(not when triton is), so it must be set before that import: pytest loads this conftest
before it imports the test modules of this folder. If a test module collected earlier
(another folder) already imported triton_kernel without it, the module is reloaded here so
that its kernels are rebuilt for the interpreter (`tk.` attribute lookups then see the new
kernels). setdefault: TRITON_INTERPRET=0 on a GPU host runs the same tests natively on CUDA.
"""
from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

_loaded = sys.modules.get("sc2deploy.plugins.triton_kernel")
if _loaded is not None and os.environ["TRITON_INTERPRET"] == "1" and not _loaded.INTERPRET:
    importlib.reload(_loaded)
