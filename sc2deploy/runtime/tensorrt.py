"""The TensorRT runtime: an engine folder made by `sc2deploy build`, behind the Runtime interface. The engine
is checked against this machine and deserialized by the loader of runtime/trt_engine.py; this module runs it.

Execution. One engine, two execution contexts sharing one activation buffer (they never run
at once): context 0 on the prefill profile, context 1 on the decode profile. The KV cache is
preallocated on the GPU, per layer two buffers `cur` and `nxt` of (max_batch, Nkv, C, H):
the plugin's present cache is an output distinct from its past input (TensorRT does not alias
them), so a call reads the past from one buffer and writes the present into the other:
  * prefill of a fresh prompt: past = nxt rows (not read: a first prompt has no past),
    present = cur rows. No copy.
  * decode of `slots`: one call over the contiguous rows [min, max] (rows in between that are
    not decoding ride along with a dummy token; their results are discarded), past = cur
    rows, present = nxt rows; then the decoded rows are copied back into cur (or, when every
    slot decodes, the buffers swap).
  * a prompt longer than the prefill profile is prefilled in chunks (past = cur, present =
    nxt, copied back), which the contract supports exactly for any ring size; extend() (chunked
    prefill, and the rest of a prompt whose prefix was restored from the prefix cache) is the same.
Prefix reuse copies rows of `cur` (the contract's ring: slot = position % C); unverified here, as is
all of this module (no TensorRT on these machines).
Inputs follow the export: input_ids / attention_mask (int64; only row sums matter) and
past_key_values.{i}.key|value; outputs logits and present.{i}.key|value.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sc2deploy.config import Config
from sc2deploy.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, MANIFEST, engine_limits, past_name, present_name
from sc2deploy.errors import UserError
from sc2deploy.runtime.base import Runtime
from sc2deploy.runtime.trt_engine import TrtEngine, load_trt_engine

if TYPE_CHECKING:
    import tensorrt

PREFILL_CONTEXT, DECODE_CONTEXT = 0, 1


class TrtRuntime(Runtime):
    name = "trt"

    def __init__(self, engine: TrtEngine | str | Path, max_batch: int = 1, capacity: int | None = None,
                 threads: int | None = None, device: int = 0):
        """Run `engine`: a loaded TrtEngine (on its device), or an engine folder, loaded here on CUDA device
        `device` by `load_trt_engine`. The loaded engine is kept with the logger and runtime it must not outlive."""
        self._loaded = engine if isinstance(engine, TrtEngine) else load_trt_engine(engine, device)
        trt, cuda_engine, folder = self._loaded.trt, self._loaded.engine, self._loaded.folder
        if threads:
            torch.set_num_threads(threads)
        self.folder, self.manifest, self.device = folder, self._loaded.manifest, self._loaded.device
        self.config = Config.from_hf_dict(self.manifest.config, source=str(folder / MANIFEST))
        self.dtype = self.manifest.dtype
        engine_batch, self.max_input_len, self.max_seq_len, engine_capacity = engine_limits(self.manifest)
        if max_batch > engine_batch:
            raise UserError(f"{max_batch} slots asked, but the engine {folder} was built for batches of at most "
                            f"{engine_batch}: use fewer slots or rebuild with `sc2deploy build --max-batch {max_batch}`")
        if capacity is not None and capacity > engine_capacity and engine_capacity < self.config.window:
            raise UserError(f"sequences of {capacity} positions asked, but the engine {folder} keeps {engine_capacity} "
                            f"cache positions (built with --max-seq-len {self.max_seq_len}): rebuild with a larger "
                            "--max-seq-len")
        self.max_batch, self.capacity = max_batch, engine_capacity
        self._trt, self._engine = trt, cuda_engine
        if cuda_engine.num_optimization_profiles < 2:
            raise UserError(f"the engine in {folder} has {cuda_engine.num_optimization_profiles} optimization "
                            "profile(s), expected prefill and decode; rebuild it with `sc2deploy build`")
        self._check_bindings()

        # Two contexts, one activation buffer: they never run concurrently.
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self._contexts: list[tensorrt.IExecutionContext] = [cuda_engine.create_execution_context(strategy)
                                                            for _ in range(2)]
        size = max(cuda_engine.get_device_memory_size_for_profile_v2(i) for i in range(2))
        self._scratch = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        for index, context in enumerate(self._contexts):
            if context is None:
                raise UserError("TensorRT could not create an execution context (out of GPU memory?)")
            context.set_device_memory(self._scratch.data_ptr(), size)
            context.set_optimization_profile_async(index, self._stream())
        self._synchronize()

        c = self.config
        shape = (max_batch, c.num_key_value_heads, self.capacity, c.head_dim)
        cache_dtype = self._torch_dtype(cuda_engine.get_tensor_dtype(past_name(0, "key")))
        self._cur = [[torch.zeros(shape, dtype=cache_dtype, device=self.device) for _ in range(2)]
                     for _ in range(c.num_hidden_layers)]
        self._nxt = [[torch.zeros(shape, dtype=cache_dtype, device=self.device) for _ in range(2)]
                     for _ in range(c.num_hidden_layers)]
        self._logits_dtype = self._torch_dtype(cuda_engine.get_tensor_dtype(LOGITS))
        self._init_slots()

    # ---------------------------------------------------------------- Runtime
    supports_extend = supports_prefix_reuse = True

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: Sequence[int], all_logits: bool = False) -> Tensor:
        self._check_prefill(slot, token_ids)
        self._check_length(len(token_ids))
        return self._feed(slot, list(token_ids), 0, all_logits)

    @torch.inference_mode()
    def extend(self, slot: int, token_ids: Sequence[int], all_logits: bool = False) -> Tensor:
        self._check_extend(slot, token_ids)
        self._check_length(self._lengths[slot] + len(token_ids))
        return self._feed(slot, list(token_ids), self._lengths[slot], all_logits)

    def _feed(self, slot: int, ids: list[int], past: int, all_logits: bool) -> Tensor:
        """`ids` after the `past` tokens the slot holds, in chunks of the prefill profile."""
        pieces = []
        done = 0
        rows = slice(slot, slot + 1)
        while done < len(ids):
            chunk = ids[done:done + self.max_input_len]
            tokens = torch.tensor([chunk], dtype=torch.int64, device=self.device)
            mask = torch.ones((1, past + done + len(chunk)), dtype=torch.int64, device=self.device)
            if past + done == 0:  # a first prompt reads no past: write the present straight into cur
                logits = self._run(PREFILL_CONTEXT, tokens, mask, past=self._nxt, present=self._cur, rows=rows)
            else:
                logits = self._run(PREFILL_CONTEXT, tokens, mask, past=self._cur, present=self._nxt, rows=rows)
                self._copy_back([slot])
            pieces.append(logits[0] if all_logits else logits[0, -1:])
            done += len(chunk)
        self._lengths[slot] = past + len(ids)
        out = torch.cat(pieces).float().cpu()
        return out if all_logits else out[-1]

    def _cache_rows(self, slot: int) -> list[tuple[Tensor, Tensor]]:
        return [(key[slot], value[slot]) for key, value in self._cur]  # the contract's ring, on the GPU

    @torch.inference_mode()
    def prefill_batch(self, prompts: Sequence[Sequence[int]]) -> list[Tensor]:
        for slot, prompt in enumerate(prompts):
            self._check_prefill(slot, prompt)
            self._check_length(len(prompt))
        longest = max(len(p) for p in prompts)
        if longest > self.max_input_len:
            return super().prefill_batch(prompts)
        n = len(prompts)
        tokens = torch.zeros((n, longest), dtype=torch.int64)
        mask = torch.zeros((n, longest), dtype=torch.int64)
        for row, p in enumerate(prompts):
            tokens[row, :len(p)] = torch.tensor(list(p), dtype=torch.int64)
            mask[row, :len(p)] = 1
        logits = self._run(PREFILL_CONTEXT, tokens.to(self.device), mask.to(self.device), past=self._nxt,
                           present=self._cur, rows=slice(0, n))
        for slot, p in enumerate(prompts):
            self._lengths[slot] = len(p)
        return [logits[row, :len(p)].float().cpu() for row, p in enumerate(prompts)]

    @torch.inference_mode()
    def decode(self, slots: Sequence[int], token_ids: Sequence[int]) -> Tensor:
        self._check_decode(slots, token_ids)
        lo, hi = min(slots), max(slots) + 1
        token_of = dict(zip(slots, token_ids))
        totals = []
        for slot in range(lo, hi):
            if slot in token_of:
                self._check_length(self._lengths[slot] + 1)
                totals.append(self._lengths[slot] + 1)
            else:
                totals.append(1)  # a row riding along: a dummy first token, its present is discarded
        width = max(totals)
        tokens = torch.tensor([[token_of.get(s, 0)] for s in range(lo, hi)], dtype=torch.int64)
        mask = (torch.arange(width)[None, :] < torch.tensor(totals)[:, None]).to(torch.int64)
        logits = self._run(DECODE_CONTEXT, tokens.to(self.device), mask.to(self.device), past=self._cur,
                           present=self._nxt, rows=slice(lo, hi))
        if lo == 0 and hi == self.max_batch and len(slots) == self.max_batch:
            self._cur, self._nxt = self._nxt, self._cur
        else:
            self._copy_back(list(slots))
        for slot in slots:
            self._lengths[slot] += 1
        picked = torch.tensor([s - lo for s in slots], device=self.device)
        return logits[:, -1].index_select(0, picked).float().cpu()

    def describe(self) -> dict:
        return {**super().describe(), "engine": str(self.folder), "tensorrt": str(getattr(self._trt, "__version__", "?")),
                "plugin": self.manifest.plugin.get("mode"), "max_input_len": self.max_input_len,
                "max_seq_len": self.max_seq_len}

    # ---------------------------------------------------------------- execution
    def _run(self, context_index: int, tokens: Tensor, mask: Tensor, *, past: list, present: list,
             rows: slice) -> Tensor:
        context = self._contexts[context_index]
        batch, seq = tokens.shape
        logits = torch.empty((batch, seq, self.config.vocab_size), dtype=self._logits_dtype, device=self.device)
        tokens, mask = tokens.contiguous(), mask.contiguous()
        self._bind(context, INPUT_IDS, tokens, is_input=True)
        self._bind(context, ATTENTION_MASK, mask, is_input=True)
        for layer in range(self.config.num_hidden_layers):
            for k, kind in enumerate(("key", "value")):
                self._bind(context, past_name(layer, kind), past[layer][k][rows], is_input=True)
                self._bind(context, present_name(layer, kind), present[layer][k][rows], is_input=False)
        self._bind(context, LOGITS, logits, is_input=False)
        if not context.execute_async_v3(self._stream()):
            raise RuntimeError(f"TensorRT failed to run the engine (batch {batch}, sequence {seq}, "
                               f"total {mask.shape[1]}); see the TensorRT log above")
        return logits

    def _bind(self, context: tensorrt.IExecutionContext, name: str, tensor: Tensor, is_input: bool) -> None:
        if is_input and not context.set_input_shape(name, tuple(tensor.shape)):
            raise RuntimeError(f"TensorRT refused shape {tuple(tensor.shape)} for {name} (outside the engine's "
                               f"profiles: batch <= {self.max_batch}, prefill <= {self.max_input_len}, "
                               f"sequence <= {self.max_seq_len})")
        if not tensor.is_contiguous():
            raise AssertionError(f"{name} is not contiguous")
        context.set_tensor_address(name, tensor.data_ptr())

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _copy_back(self, slots: list[int]) -> None:
        index = torch.tensor(slots, device=self.device)
        for cur, nxt in zip(self._cur, self._nxt):
            for k in range(2):
                cur[k].index_copy_(0, index, nxt[k].index_select(0, index))

    def _check_length(self, length: int) -> None:
        if length > self.max_seq_len:
            raise UserError(f"a sequence of {length} tokens is longer than the engine's --max-seq-len "
                            f"{self.max_seq_len}; rebuild the engine with a larger --max-seq-len")

    def _check_bindings(self) -> None:
        engine = self._engine
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        needed = {INPUT_IDS, ATTENTION_MASK, LOGITS}
        for layer in range(self.config.num_hidden_layers):
            for kind in ("key", "value"):
                needed |= {past_name(layer, kind), present_name(layer, kind)}
        missing = sorted(needed - names)
        if missing:
            raise UserError(f"the engine in {self.folder} lacks I/O tensors {missing[:4]}; it was not built from an "
                            "`sc2deploy export --target trt` artifact of this model: rebuild it")

    def _torch_dtype(self, dtype: tensorrt.DataType) -> torch.dtype:
        trt = self._trt
        table = {trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
                 trt.DataType.FLOAT: torch.float32, trt.DataType.INT64: torch.int64, trt.DataType.INT32: torch.int32}
        if dtype not in table:
            raise UserError(f"the engine has a {dtype} tensor where sc2deploy expects fp16, bf16 or fp32; rebuild it")
        return table[dtype]
