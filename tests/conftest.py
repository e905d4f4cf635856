"""Shared fixtures: random checkpoints written by transformers (the independent oracle) and by sc2deploy.

Triton kernels run on CPU through Triton's interpreter: TRITON_INTERPRET is read by `@triton.jit`
when sc2deploy.plugins.triton_kernel is imported (not when triton is), so it is set here, before
pytest imports any test module. If something imported triton_kernel earlier without it, the module
is reloaded so that its kernels are rebuilt for the interpreter. setdefault: TRITON_INTERPRET=0 on a
GPU host runs the same tests natively on CUDA.

`@pytest.mark.gpu` tests need a CUDA GPU (`pytest -m gpu` on a GPU host): skipped, with the reason,
where there is none.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
# The runtimes' verification cache (runtime/hash_cache.py) goes to a folder of this run, not the user's ~/.cache.
os.environ["SC2DEPLOY_CACHE_DIR"] = tempfile.mkdtemp(prefix="sc2deploy-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

_loaded = sys.modules.get("sc2deploy.plugins.triton_kernel")
if _loaded is not None and os.environ["TRITON_INTERPRET"] == "1" and not _loaded.INTERPRET:
    for _name in ("sc2deploy.plugins.triton_kernel", "sc2deploy.plugins.triton_decode"):  # @triton.jit modules
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DATA = REPO / "tests" / "data" / "starcoder2-tokenizer"  # llama.cpp's test vectors; see PROVENANCE.md

# Oracle configs: window below the prompt length, tied and untied heads, no biases, Nq/Nkv of 1, 2, 3, 4.
HF_CONFIGS = {
    "mha-w8": dict(num_attention_heads=4, num_key_value_heads=4, sliding_window=8),
    "gqa2-tied": dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=8, tie_word_embeddings=True),
    "gqa3-nobias": dict(num_attention_heads=6, num_key_value_heads=2, sliding_window=12, use_bias=False),
    "mqa4-w16": dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=16),
}


def make_hf_model(folder: Path, seed: int = 0, vocab_size: int = 1000, head_dim: int = 16,
                  architecture: str = "Starcoder2ForCausalLM", **overrides):
    """A random Starcoder2ForCausalLM (or another StarCoder2 class: `architecture`) saved with save_pretrained: a
    real Hugging Face checkpoint."""
    import transformers
    from transformers import Starcoder2Config

    heads = overrides.pop("num_attention_heads", 4)
    fields = dict(vocab_size=vocab_size, hidden_size=heads * head_dim, intermediate_size=4 * heads * head_dim,
                  num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=2,
                  max_position_embeddings=512, sliding_window=8, rope_theta=10000.0, bos_token_id=0,
                  eos_token_id=0, tie_word_embeddings=False, use_bias=True)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(Starcoder2Config(**fields)).eval()
    with torch.no_grad():  # transformers initialises biases and norms to constants: randomise them too
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


@pytest.fixture(params=sorted(HF_CONFIGS))
def hf_checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model = make_hf_model(folder, **dict(HF_CONFIGS[request.param]))
    return folder, model


def _artifacts():
    """tests/export/artifacts.py, loaded once by path: a session-wide store of checkpoints and exports."""
    name, path = "sc2deploy_tests_artifacts", REPO / "tests" / "export" / "artifacts.py"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@pytest.fixture(scope="session")
def helpers():
    """The helper module tests/export/artifacts.py (make_hf_model, ort_session, run_prompt, ...)."""
    return _artifacts()


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    return _artifacts().store(tmp_path_factory)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False); run `pytest -m gpu` "
                                   "on a GPU host, e.g. through scripts/gpu-check.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
