"""The cuda runtime: the reference model on a GPU, its attention in Triton, decode as CUDA graphs.

The weights and modules are the reference model's (`load_model` on the device, bf16/fp16, or
fp32), with q/k/v run as one projection (`fuse_qkv`: the three weights become views of one);
only attention differs, and it keeps the contract of `sc2deploy.attention`:
  * prefill: `triton_attention.launch` (RoPE + cache kernel, then windowed flash attention) with
    the slot's cache rows as both past and present: a first prompt reads no past, so writing
    in place is exact;
  * decode: `triton_decode.decode_attention` (flash-decoding split over the window, then the
    in-place append of the new key and value).
The KV cache is allocated once: per layer (max_batch + 1, Nkv, C, H) on the device, ring slot
p % C. Row max_batch is scratch: the padding rows of a graph bucket write there.

Decode runs as one CUDA graph per batch bucket (1, 2, 4, ... max_batch), captured when the
runtime opens: a step copies the token ids, cache rows and positions of its slots into a static
int32 buffer (padding rows aim at the scratch row) and replays the graph; nothing else crosses
to the host, and any set of slots, contiguous or not, runs in one call. Logits stay on the
device (float32).

Without a GPU the same code runs on CPU tensors under TRITON_INTERPRET=1 (without graphs):
that is how it is tested against the eager model on machines with no GPU.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sc2deploy.checkpoint import TensorSource, load_model
from sc2deploy.config import torch_dtype
from sc2deploy.contract import DTYPE_BYTES
from sc2deploy.errors import UserError
from sc2deploy.model import Attention, DecoderLayer, Starcoder2
from sc2deploy.runtime.base import PaddedPrefill

DTYPES = tuple(DTYPE_BYTES)


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two below max_batch, then max_batch: the batch sizes decode graphs are captured for."""
    buckets = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return buckets + [max_batch]


def check_device(device: str | torch.device) -> torch.device:
    """The device the cuda runtime can run on here, or a UserError naming the fix."""
    from sc2deploy.plugins.triton_kernel import INTERPRET

    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("the cuda backend needs an NVIDIA GPU and a CUDA build of torch, and this machine has "
                            "none; use --backend eager or ort on CPU")
        return device
    if device.type == "cpu" and INTERPRET:
        return device
    raise UserError(f"the cuda backend runs on a CUDA device, not {device} (on CPU it runs only under "
                    "TRITON_INTERPRET=1, for tests); use --device cuda")


def fuse_qkv(attention: Attention) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) of q, k and v as one projection; the three modules' parameters become views of them."""
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    sizes = [p.out_features for p in projections]
    fused: list[Tensor | None] = []
    for kind in ("weight", "bias"):
        parts = [getattr(p, kind) for p in projections]
        if parts[0] is None:
            fused.append(None)
            continue
        whole = torch.cat([t.detach() for t in parts])
        for p, view in zip(projections, whole.split(sizes)):
            setattr(p, kind, nn.Parameter(view, requires_grad=False))
        fused.append(whole)
    return cast(Tensor, fused[0]), fused[1]


class CudaRuntime(PaddedPrefill):
    name = "cuda"

    def __init__(self, source: TensorSource | None = None, dtype: str = "bf16", max_batch: int = 1,
                 capacity: int | None = None, *, device: str | torch.device | None = None, graphs: bool | None = None,
                 model: Starcoder2 | None = None, threads: int | None = None):
        """`source`'s weights loaded on `device` in `dtype` (or an already loaded reference `model`).

        device: default cuda. graphs: capture decode as CUDA graphs (default: on a CUDA device). capacity: cache
        positions per slot (default, and at most, the window: older positions are never read). threads: torch's
        CPU threads (sampling and bookkeeping run there).
        """
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; the cuda runtime runs {', '.join(DTYPES)}")
        self.device = check_device("cuda" if device is None else device)
        if threads:
            torch.set_num_threads(threads)
        try:
            import triton  # noqa: F401
        except ImportError:
            raise UserError("the cuda backend needs triton: pip install triton") from None
        if model is None:
            if source is None:
                raise UserError("the cuda backend needs --checkpoint DIR or --size SIZE")
            model = load_model(source, dtype, device=self.device)
        self.model, self.config, self.dtype, self.max_batch = model, model.config, dtype, max_batch
        self.capacity = self.config.cache_positions(capacity)
        c = self.config
        wdtype = torch_dtype(dtype)
        if model.model.embed_tokens.weight.dtype != wdtype or model.model.embed_tokens.weight.device != self.device:
            raise ValueError(f"the model must hold {dtype} weights on {self.device}")
        self.layers = [cast(DecoderLayer, layer) for layer in model.model.layers]
        self._qkv = [fuse_qkv(layer.self_attn) for layer in self.layers]
        self._qkv_sizes = [c.q_size, c.kv_size, c.kv_size]
        self.cos = cast(Tensor, model.cos_cache).to(self.device, torch.float32).contiguous()
        self.sin = cast(Tensor, model.sin_cache).to(self.device, torch.float32).contiguous()
        shape = (max_batch + 1, c.num_key_value_heads, self.capacity, c.head_dim)  # + the scratch row
        self.cache = [(torch.zeros(shape, dtype=wdtype, device=self.device),
                       torch.zeros(shape, dtype=wdtype, device=self.device)) for _ in range(c.num_hidden_layers)]
        self._scratch = max_batch
        self._step = torch.zeros((3, max_batch), dtype=torch.int32, device=self.device)  # ids, cache rows, positions
        self._splits = {b: self._split_count(b) for b in batch_buckets(max_batch)}
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._init_slots()
        if self.graphs:
            self._capture_all()

    def describe(self) -> dict:
        return {**super().describe(), "device": str(self.device), "cuda_graphs": self.graphs,
                "graph_buckets": sorted(self._splits), "decode_splits": self._splits}

    # ---------------------------------------------------------------- interface
    @torch.inference_mode()
    def decode(self, slots: Sequence[int], token_ids: Sequence[int]) -> Tensor:
        self._check_decode(slots, token_ids)
        n = len(slots)
        bucket = next(b for b in sorted(self._splits) if b >= n) if self.graphs else n
        pad = bucket - n
        step = torch.tensor([list(token_ids) + [0] * pad, list(slots) + [self._scratch] * pad,
                             [self._lengths[s] for s in slots] + [0] * pad], dtype=torch.int32, device="cpu")
        self._step[:, :bucket].copy_(step)
        if self.graphs:
            graph, logits = self._graphs[bucket]
            graph.replay()
        else:
            logits = self._decode_step(bucket)
        for s in slots:
            self._lengths[s] += 1
        return logits[:n].clone() if self.graphs else logits

    # ---------------------------------------------------------------- running
    def _prefill_rows(self, prompts: list[list[int]], first_slot: int, all_logits: bool) -> Tensor:
        """First prompts: the slots' cache rows are written in place."""
        from sc2deploy.plugins.triton_attention import launch

        c, model = self.config, self.model
        longest = max(len(p) for p in prompts)
        ids = torch.tensor([p + [0] * (longest - len(p)) for p in prompts], dtype=torch.int64, device=self.device)
        seqlens = torch.tensor([len(p) - 1 for p in prompts], dtype=torch.int32, device=self.device)
        total = torch.tensor(longest, dtype=torch.int32, device=self.device)
        rows = slice(first_slot, first_slot + len(prompts))

        def attend(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
            kc, vc = k_cache[rows], v_cache[rows]
            out, _, _, _ = launch(q, k, v, kc, vc, seqlens, total, self.cos, self.sin, c.num_attention_heads,
                                  c.num_key_value_heads, c.sliding_window or 0, c.head_dim**-0.5, fused=False,
                                  present_key=kc, present_value=vc)
            return out

        x = self._layers(model.model.embed_tokens(ids), attend)
        if not all_logits:
            last = (seqlens.to(torch.int64))[:, None, None].expand(-1, 1, x.shape[-1])
            x = x.gather(1, last)
        return F.linear(model.model.norm(x), model.head_weight).float()

    def _decode_step(self, batch: int) -> Tensor:
        """Logits (batch, vocab) of one token per row of the static step buffer (graph-capturable)."""
        from sc2deploy.plugins.triton_decode import decode_attention

        c, model = self.config, self.model
        ids, rows, positions = self._step[0, :batch], self._step[1, :batch], self._step[2, :batch]
        splits = self._splits.get(batch) or self._split_count(batch)

        def attend(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
            return decode_attention(q, k, v, k_cache, v_cache, rows, positions, self.cos, self.sin,
                                    c.num_attention_heads, c.num_key_value_heads, c.sliding_window or 0,
                                    c.head_dim**-0.5, num_splits=splits)

        x = self._layers(model.model.embed_tokens(ids), attend)
        return F.linear(model.model.norm(x), model.head_weight).float()

    def _layers(self, x: Tensor, attend) -> Tensor:
        for layer, (weight, bias), (k_cache, v_cache) in zip(self.layers, self._qkv, self.cache):
            q, k, v = F.linear(layer.input_layernorm(x), weight, bias).split(self._qkv_sizes, dim=-1)
            x = x + layer.self_attn.o_proj(attend(q, k, v, k_cache, v_cache))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x

    def _split_count(self, batch: int) -> int:
        from sc2deploy.plugins.triton_decode import sm_count, split_count

        c = self.config
        max_keys = min(c.sliding_window - 1, self.capacity) if c.sliding_window else self.capacity
        return split_count(batch, c.num_key_value_heads, max_keys, sm_count(self.device))

    @torch.inference_mode()
    def _capture_all(self) -> None:
        """One CUDA graph per bucket; the warm-up and capture runs touch only the scratch row."""
        self._step[0].zero_()
        self._step[1].fill_(self._scratch)
        self._step[2].zero_()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for bucket in self._splits:
                self._decode_step(bucket)  # compiles the Triton kernels outside the capture
        torch.cuda.current_stream(self.device).wait_stream(side)
        for bucket in sorted(self._splits, reverse=True):  # largest first: later graphs reuse its pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._decode_step(bucket)
            self._graphs[bucket] = (graph, logits)
        torch.cuda.synchronize(self.device)
