"""What every test module here needs: triton, and either a GPU or Triton's interpreter, which runs the kernels on
CPU tensors (TRITON_INTERPRET=1, set by tests/conftest.py before triton_kernel is imported). Without them each
module is skipped, with the reason, before it is imported."""
from __future__ import annotations

import pytest
import torch


class KernelTests(pytest.Module):
    def collect(self):
        pytest.importorskip("triton")
        from sc2deploy.plugins import triton_kernel

        if not triton_kernel.INTERPRET and not torch.cuda.is_available():
            pytest.skip("triton_kernel was imported without TRITON_INTERPRET=1 and there is no GPU",
                        allow_module_level=True)
        return super().collect()


def pytest_pycollect_makemodule(module_path, parent):
    return KernelTests.from_parent(parent, path=module_path)
