"""Hugging Face checkpoints: read lazily tensor by tensor, write random ones streamed.

A checkpoint folder holds config.json, model.safetensors (or shards listed by
model.safetensors.index.json) and usually tokenizer.json. Only safetensors are read:
pickled weights are never loaded.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from sc2deploy.config import Config, torch_dtype
from sc2deploy.contract import sha256_file
from sc2deploy.errors import UserError
from sc2deploy.staging import staging_folder
from sc2deploy.tasks import (BASE_MODEL, CAUSAL_LM, SEQUENCE_CLASSIFICATION, TASKS, TOKEN_CLASSIFICATION,
                             require_task)

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
WEIGHT_DTYPES = ("F32", "F16", "BF16", "F64")  # safetensors dtypes read as weights (cast on read); never ints or bools
SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size
RANDOM_CHUNK = 1 << 22  # elements per independently seeded block of random weights
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class TensorSource:
    """Named tensors of one model, produced one at a time in a requested dtype."""

    config: Config
    description: str

    def names(self) -> list[str]:
        return list(self.config.tensor_shapes())

    def get(self, name: str, dtype: str) -> Tensor:
        raise NotImplementedError

    def blocks(self, name: str, dtype: str) -> Iterator[tuple[int, Tensor]]:
        """(flat offset, values) pieces of one tensor, for writers that stream; one piece unless overridden."""
        yield 0, self.get(name, dtype).reshape(-1)


# ---------------------------------------------------------------- reading
class CheckpointSource(TensorSource):
    """A Hugging Face checkpoint folder, read lazily through safetensors' memory map."""

    def __init__(self, folder: str | Path, expected: Config | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"checkpoint folder {self.folder} does not exist")
        self.config = Config.load(self.folder)
        if expected is not None:
            check_config_matches(self.config, expected, str(self.folder))
        self.description = f"checkpoint {self.folder}"
        self._file_of = self._weight_map()
        self._check_names_and_shapes()

    def _weight_map(self) -> dict[str, Path]:
        index, single = self.folder / INDEX_FILE, self.folder / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not all(isinstance(f, str) and f == Path(f).name for f in weight_map.values()):
                    raise ValueError("weight_map must name a file in the folder for each tensor")
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OSError) as e:
                raise UserError(f"{index} is corrupt ({str(e)[:200] or type(e).__name__}); re-download the checkpoint") from None
            return {name: self.folder / file for name, file in weight_map.items()}
        if single.is_file():
            return {name: single for name in _safetensors_header(single)}
        if list(self.folder.glob("*.bin")) or list(self.folder.glob("*.pt")):
            raise UserError(f"{self.folder} has only pickled weights; sc2deploy reads safetensors only "
                            "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))")
        raise UserError(f"{self.folder} has no {SINGLE_FILE} or {INDEX_FILE}")

    def _check_names_and_shapes(self) -> None:
        expected = self.config.tensor_shapes()
        headers = {f: _safetensors_header(f) for f in set(self._file_of.values())}
        for name, shape in expected.items():
            if name not in self._file_of:
                mismatch = self._architecture_mismatch()
                if mismatch:
                    raise UserError(f"checkpoint {self.folder} has no tensor {name}, which "
                                    f"{self.config.head.architecture} needs (shape {list(shape)}); {mismatch}")
                raise UserError(f"checkpoint {self.folder} has no tensor {name} "
                                f"(expected for StarCoder2 with this config.json, shape {list(shape)})")
            entry = headers[self._file_of[name]].get(name)
            if entry is None:
                raise UserError(f"{self._file_of[name]} lacks tensor {name} although the index lists it there")
            if tuple(entry["shape"]) != shape:
                raise UserError(f"tensor {name} in {self._file_of[name].name} has shape {entry['shape']}, "
                                f"expected {list(shape)} from config.json; the weights and config do not match")
            if entry["dtype"] not in WEIGHT_DTYPES:
                raise UserError(f"tensor {name} in {self._file_of[name].name} has dtype {entry['dtype']}; weights "
                                f"must be floating point ({', '.join(WEIGHT_DTYPES)}): the file is corrupt or not "
                                "a StarCoder2 checkpoint")
        ignorable: tuple[str, ...] = ("rotary_emb.inv_freq",)
        if self.config.tie_word_embeddings:
            ignorable += ("lm_head.weight",)  # some tied checkpoints still store the head
        unexpected = [n for n in self._file_of if n not in expected and not n.endswith(ignorable)]
        if unexpected:
            mismatch = self._architecture_mismatch()
            raise UserError(f"checkpoint {self.folder} has unexpected tensor {unexpected[0]}"
                            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                            + (f"; {mismatch}" if mismatch else
                               "; is it a StarCoder2 checkpoint matching its config.json?"))

    def _architecture_mismatch(self) -> str | None:
        """What the tensor names say the checkpoint is, when config.json's architectures says otherwise."""
        found = _architecture_of(set(self._file_of))
        named = self.config.head.architecture
        if found == named:
            return None
        default = " (also the default when it names none)" if named == CAUSAL_LM else ""
        return (f"its tensors are those of a {found}, but config.json's architectures gives {named}{default}: set "
                f'"architectures": ["{found}"] in {self.folder / "config.json"}, or use the checkpoint that matches it')

    def get(self, name: str, dtype: str) -> Tensor:
        from safetensors import SafetensorError, safe_open

        path = self._file_of[name]
        try:
            with safe_open(str(path), framework="pt") as f:
                tensor = f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise UserError(f"cannot read tensor {name} from {path}: {e}; the file is corrupt or truncated") from None
        return tensor.to(torch_dtype(dtype))

    def file_hashes(self) -> dict[str, str]:
        return {p.name: sha256_file(p) for p in sorted(set(self._file_of.values()))}


def _architecture_of(names: set[str]) -> str:
    """The StarCoder2 class whose checkpoints have tensors named so (transformers' names, tasks.py)."""
    if "score.bias" in names:
        return TOKEN_CLASSIFICATION
    if "score.weight" in names:
        return SEQUENCE_CLASSIFICATION  # or a token classifier without a bias: config.json tells them apart
    if any(n.startswith("embed_tokens.") for n in names):
        return BASE_MODEL
    return CAUSAL_LM


def _safetensors_header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            (n,) = struct.unpack("<Q", raw_len)
            if n > 100 * 2**20:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
        size = path.stat().st_size
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        header.pop("__metadata__", None)
        bad = next((name for name, v in header.items() if not _is_header_entry(v)), None)
        if bad is not None:
            raise ValueError(f"the header entry of {str(bad)[:100]!r} lacks a dtype, shape or data_offsets")
    except (struct.error, ValueError, RecursionError, OSError) as e:  # ValueError: JSON and UTF-8 errors too
        raise UserError(f"{path} is not a valid safetensors file ({e}); re-download or rewrite it") from None
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise UserError(f"{path} is truncated: {size} bytes, its header needs {8 + n + end}; re-download or rewrite it")
    return header


def _is_header_entry(entry: object) -> bool:
    """{"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]}, as safetensors writes."""
    def ints(v: object) -> bool:
        return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)

    return (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and ints(entry.get("shape"))
            and ints(entry.get("data_offsets")) and len(entry["data_offsets"]) == 2)


def check_config_matches(found: Config, expected: Config, where: str) -> None:
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "sliding_window")
    diffs = [f"{f}={getattr(found, f)} (preset: {getattr(expected, f)})" for f in fields
             if getattr(found, f) != getattr(expected, f)]
    if diffs:
        raise UserError(f"{where}: config.json contradicts the requested size: {', '.join(diffs)}; "
                        "drop --size or pick the size that matches the checkpoint")


# ---------------------------------------------------------------- random weights
class RandomSource(TensorSource):
    """Deterministic random weights: a tensor depends only on (seed, name), never on the order read."""

    def __init__(self, config: Config, seed: int = 0):
        self.config, self.seed = config, seed
        self.description = f"random weights (seed {seed})"
        self._shapes = config.tensor_shapes()

    def get(self, name: str, dtype: str) -> Tensor:
        out = torch.empty(self._shapes[name], dtype=torch_dtype(dtype), device="cpu")
        for start, block in self.blocks(name, dtype):
            out.view(-1)[start:start + block.numel()] = block
        return out

    def blocks(self, name: str, dtype: str = "fp32") -> Iterator[tuple[int, Tensor]]:
        """(flat offset, float32 values) in chunks of RANDOM_CHUNK elements, whatever `dtype`; bounded memory."""
        shape = self._shapes[name]
        numel = 1
        for d in shape:
            numel *= d
        kind = name.rsplit(".", 1)[-1]
        is_norm = "norm" in name
        for index, start in enumerate(range(0, numel, RANDOM_CHUNK)):
            n = min(RANDOM_CHUNK, numel - start)
            digest = hashlib.sha256(f"{self.seed}:{name}:{index}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            values = torch.randn(n, generator=gen, device="cpu")
            if is_norm:
                values = (1.0 + 0.1 * values) if kind == "weight" else 0.1 * values
            else:
                values = 0.02 * values
            yield start, values


# ---------------------------------------------------------------- writing
def write_checkpoint(source: TensorSource, out: str | Path, dtype: str, tokenizer_json: Path | None = None,
                     shard_bytes: int = SHARD_BYTES, progress: Callable[[int], None] | None = None,
                     force: bool = False) -> Path:
    """Write `source` as a Hugging Face checkpoint; built in a temporary folder and renamed into place."""
    out = Path(out)
    with staging_folder(out, force, "checkpoint", ("config.json",)) as tmp:
        shapes = source.config.tensor_shapes()
        nbytes = {n: _numel(s) * torch_dtype(dtype).itemsize for n, s in shapes.items()}
        shards = _plan_shards(list(shapes), nbytes, shard_bytes)
        names_of_file = {}
        for i, names in enumerate(shards):
            file = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(tmp / file, names, shapes, dtype, source, progress)
            names_of_file[file] = names
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(nbytes.values())},
                     "weight_map": {n: f for f, names in names_of_file.items() for n in names}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        cfg = source.config.to_hf_dict()
        cfg["torch_dtype"] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if tokenizer_json is not None:
            shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _plan_shards(names: list[str], nbytes: dict[str, int], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        if shards[-1] and size + nbytes[name] > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    return shards


def _write_safetensors(path: Path, names: list[str], shapes: dict, dtype: str, source: TensorSource,
                       progress: Callable[[int], None] | None) -> None:
    tdtype = torch_dtype(dtype)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        size = _numel(shapes[name]) * tdtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[tdtype], "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            for _, block in source.blocks(name, dtype):
                data = block.to(tdtype).contiguous()
                f.write(data.view(torch.uint8).numpy().tobytes())
                if progress:
                    progress(data.numel() * tdtype.itemsize)


# ---------------------------------------------------------------- model loading
def load_model(source: TensorSource, dtype: str = "fp32", device: torch.device | str | None = None):
    """Build the reference model (the causal LM) from `source` on `device` (default the CPU) without ever holding
    two copies of a weight: each tensor moves there as soon as it is read."""
    from sc2deploy.model import Starcoder2

    rerun = f"--checkpoint {source.folder}" if isinstance(source, CheckpointSource) else ""
    require_task(source.config.head, (TASKS[CAUSAL_LM],), source.description, rerun)
    return load_weights(Starcoder2, source, dtype, device)


def load_weights(model_class: Callable[[Config], torch.nn.Module], source: TensorSource, dtype: str = "fp32",
                 device: torch.device | str | None = None):
    """`model_class(config)` (parameters named as `source`'s tensors, RoPE tables cos_cache/sin_cache) with
    `source`'s weights, built as load_model builds the reference model."""
    from sc2deploy.attention import rope_cache

    config = source.config
    device = torch.device("cpu" if device is None else device)
    with torch.device("meta"):
        model = model_class(config)
    params = dict(model.named_parameters())
    for name in source.names():
        tensor = source.get(name, dtype).to(device)
        module_name, attr = name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=False))
        params.pop(name, None)
    if params:
        raise UserError(f"{source.description} did not provide {sorted(params)[0]}")
    model.cos_cache, model.sin_cache = rope_cache(config.head_dim, config.rope_theta,
                                                  config.max_position_embeddings, device)
    return model.eval()


def random_model(config: Config, dtype: str = "bf16", device: torch.device | str = "cuda", seed: int = 0):
    """The reference model with random weights made on `device` itself (15b bf16 in about a second on a GPU).

    For benchmarks: the weights depend on the device's generator, unlike RandomSource's. Linear and embedding
    weights are N(0, 0.02), norm weights 1, biases 0.
    """
    from sc2deploy.attention import rope_cache
    from sc2deploy.model import Starcoder2

    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = Starcoder2(config).to(torch_dtype(dtype))  # no memory until to_empty allocates on the device
    model = model.to_empty(device=device).requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif "norm" in name or name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.cos_cache, model.sin_cache = rope_cache(config.head_dim, config.rope_theta,
                                                  config.max_position_embeddings, device)
    return model.eval()


def open_source(checkpoint: str | Path | None = None, size: str | None = None, seed: int = 0,
                notice: Callable[[str], None] | None = None) -> TensorSource:
    """The weights a command works on: a checkpoint folder, or seeded random weights for a preset."""
    from sc2deploy.config import preset

    expected = preset(size) if size else None
    if checkpoint is not None:
        return CheckpointSource(checkpoint, expected=expected)
    if expected is None:
        raise UserError("give --checkpoint DIR or --size SIZE")
    if notice:
        notice(f"note: no --checkpoint given: using random weights for the {size} preset (seed {seed})")
    return RandomSource(expected, seed)
