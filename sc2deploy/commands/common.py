"""Arguments and helpers shared by several commands."""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sc2deploy.config import DTYPE_BYTES, PRESETS
from sc2deploy.errors import UserError
from sc2deploy.staging import MANIFEST

if TYPE_CHECKING:
    import torch


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_size(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--size", required=required, metavar="SIZE",
                        help=f"model size preset: {', '.join(PRESETS)}")


def add_weights(parser: argparse.ArgumentParser, seed_flag: str = "--weights-seed") -> None:
    """--size / --checkpoint / --weights-seed: where the weights come from."""
    add_size(parser)
    parser.add_argument("--checkpoint", metavar="DIR",
                        help="Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    add_weights_seed(parser, seed_flag)


def add_weights_seed(parser, flag: str = "--weights-seed") -> None:
    """--weights-seed, the seed of random weights (`--seed` is the sampling seed in every command)."""
    parser.add_argument(flag, dest="weights_seed", type=int, default=0, metavar="N",
                        help="seed of the random weights used without --checkpoint (default 0)")


def add_renamed_seed(parser) -> None:
    """The old weights-seed spelling of `checkpoint` and `export`, hidden: using it is a one-line error naming
    --weights-seed, not a silent change of meaning."""
    parser.add_argument("--seed", dest="renamed_seed", default=None, help=argparse.SUPPRESS)


def check_renamed_seed(args) -> None:
    if getattr(args, "renamed_seed", None) is not None:
        raise UserError(f"--seed is now --weights-seed here (the seed of the random weights; --seed is the sampling "
                        f"seed of generate, serve and complete): give --weights-seed {args.renamed_seed}")


# ---------------------------------------------------------------- what a folder is
ENGINE_FORMAT = "sc2deploy-tensorrt-engine"  # sc2deploy.build.FORMAT (build imports TensorRT's helpers)


def folder_kind(folder: str | Path) -> str | None:
    """"artifact" (an export), "engine" (a TensorRT engine folder), "checkpoint" (config.json) or None."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            found = json.loads(manifest.read_text(encoding="utf-8")).get("format")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            found = None
        return "engine" if found == ENGINE_FORMAT else "artifact"
    if (folder / "config.json").is_file():
        return "checkpoint"
    return None


def refuse_export_as_checkpoint(folder: str | Path, fix: str | None = None) -> None:
    """A one-line error when --checkpoint names an export artifact or engine folder instead of a checkpoint."""
    kind = folder_kind(folder)
    if kind == "artifact":
        raise UserError(f"--checkpoint {folder}: this is an export artifact (has {MANIFEST}); "
                        + (fix or f"use --artifact {folder}"))
    if kind == "engine":
        raise UserError(f"--checkpoint {folder}: this is a TensorRT engine folder (has {MANIFEST}); "
                        + (fix or f"use --engine {folder}"))


def open_weights(checkpoint: str | None, size: str | None, seed: int, artifact_fix: str | None = None):
    """The TensorSource of --checkpoint or --size/--weights-seed (generate, export, serve)."""
    from sc2deploy.checkpoint import open_source

    if checkpoint is not None:
        refuse_export_as_checkpoint(checkpoint, artifact_fix)
    return open_source(checkpoint, size, seed, notice)


def infer_backend(args) -> str:
    """--backend, else the one the weights imply: ort with --artifact, trt with --engine, else eager."""
    from sc2deploy.runtime import BACKENDS

    backend = args.backend or ("ort" if args.artifact else "trt" if args.engine else "eager")
    return check_choice(backend, BACKENDS, "backend")


def runtime_folder(args, backend: str) -> str:
    """The --artifact (ort) or --engine (trt) folder, after checking it exists and is of that kind."""
    flag, made_by = ("--artifact", "`sc2deploy export --target ort`") if backend == "ort" else \
        ("--engine", "`sc2deploy build`")
    folder = args.artifact if backend == "ort" else args.engine
    if folder is None:
        raise UserError(f"the {backend} backend needs {flag} DIR (made by {made_by})")
    if not Path(folder).is_dir():
        raise UserError(f"{flag} {folder}: no such folder; give the folder made by {made_by}")
    if folder_kind(folder) == "checkpoint":
        raise UserError(f"{flag} {folder}: this is a Hugging Face checkpoint, not an export; use --checkpoint "
                        f"{folder} (eager or cuda backend), or make one with {made_by}")
    return folder


def add_dtype(parser: argparse.ArgumentParser, default: str = "fp32", choices=tuple(DTYPE_BYTES)) -> None:
    parser.add_argument("--dtype", default=default, metavar="DTYPE",
                        help=f"weight and activation dtype: {', '.join(choices)} (default {default})")


def add_run_dtype(parser) -> None:
    """--dtype of a command that runs any backend (generate, serve): see check_dtype."""
    parser.add_argument("--dtype", metavar="DTYPE",
                        help=f"weight and activation dtype of the eager and cuda backends: {', '.join(DTYPE_BYTES)} "
                             "(default fp32); an artifact or engine keeps the dtype it was made with")


def check_dtype(args, backend: str, folder: str | None) -> str:
    """The dtype to run: --dtype for eager and cuda (default fp32); an artifact's or engine's own, which a
    different --dtype cannot change (an error, not a silent fp32 run)."""
    if backend in ("eager", "cuda"):
        dtype = args.dtype or "fp32"
        if dtype not in DTYPE_BYTES:
            raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
        return dtype
    fixed = _recorded_dtype(folder)
    if args.dtype is not None and fixed is not None and args.dtype != fixed:
        what, remake = (("artifact", f"re-export with `sc2deploy export --dtype {args.dtype}`") if backend == "ort"
                        else ("engine", f"re-export with `sc2deploy export --target trt --dtype {args.dtype}` "
                                        "and build again"))
        raise UserError(f"--dtype {args.dtype}: the {what} {folder} is {fixed} (fixed when it was made; --dtype "
                        f"applies to the eager and cuda backends); {remake}, or drop --dtype")
    return fixed or args.dtype or "fp32"


def _recorded_dtype(folder: str | None) -> str | None:
    try:
        dtype = json.loads((Path(str(folder)) / MANIFEST).read_text(encoding="utf-8")).get("dtype")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None  # the runtime's own checks say what is wrong with the folder
    return dtype if isinstance(dtype, str) else None


def add_device(parser) -> None:
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="device of the eager or cuda runtime: cpu, cuda or cuda:N "
                             "(default: cpu for eager, cuda for cuda)")


def resolve_device(text: str | None, backend: str = "eager") -> torch.device:
    """The torch device a --device value names (None: the backend's default), if this machine has it."""
    import torch

    if text is None:
        text = "cuda" if backend == "cuda" else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"unknown device {text!r}; give --device cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            fix = "--backend eager or ort" if backend == "cuda" else "--device cpu"
            raise UserError(f"--device {text}: CUDA is not available on this machine; use {fix} "
                            "or run on a GPU host with a CUDA build of torch")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {text}: this machine has {count} CUDA device(s); "
                            f"give cuda:0 to cuda:{count - 1}")
    return device


def check_choice(value: str, choices, what: str) -> str:
    if value not in choices:
        raise UserError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    return value


def notice(message: str) -> None:
    print(message, file=sys.stderr)


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


# ---------------------------------------------------------------- progress of long work
LOG_INTERVAL = 5.0  # seconds between progress lines when stderr is not a terminal, and between heartbeats


def _amount(n: float, unit: str) -> str:
    if unit != "B":
        return f"{n:,.0f} {unit}"
    for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {name}"
    return f"{n:.0f} B"


class LogBar:
    """progress_bar's stand-in when stderr is not a terminal: a plain line every `interval` seconds,
    "writing weights: 12.3 GiB / 30.0 GiB (41%)", and a last one at the end if any was printed."""

    def __init__(self, total: int, desc: str, unit: str = "B", interval: float = LOG_INTERVAL, stage=None):
        self.total, self.desc, self.unit, self.interval, self.stage = total, desc, unit, interval, stage
        self.n, self.printed = 0, False
        self.start = self.last = time.monotonic()

    def _line(self, now: float) -> str:
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        return f"{self.desc}: {_amount(self.n, self.unit)} / {_amount(self.total, self.unit)}{share}, " \
               f"{now - self.start:.0f} s"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            notice(self._line(now))
            self.last, self.printed = now, True
        if self.stage is not None:
            self.stage.touch()

    def close(self) -> None:
        if self.printed:
            notice(self._line(time.monotonic()))
            self.printed = False

    def __enter__(self) -> LogBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int, desc: str, unit: str = "B", stage=None):
    """A tqdm bar on a terminal; a plain line every few seconds (LogBar) when stderr is not one.
    `stage`: a StageLog whose heartbeat the bar's updates stand in for."""
    if not sys.stderr.isatty():
        return LogBar(total, desc, unit, stage=stage)
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024, file=sys.stderr)
    if stage is not None:
        update = bar.update

        def touched(n=1):
            stage.touch()
            return update(n)

        bar.update = touched
    return bar


class StageLog:
    """Stage lines on stderr ("parity: loading the artifact ..."), and while a stage runs with nothing else
    printed, a heartbeat every `interval` seconds repeating it with the time spent ("... (15 s)"), whether
    stderr is a terminal or not. Use as a context manager (the heartbeat is a daemon thread); call it with a
    message to start a stage, `end()` to stop the heartbeat, `touch()` when something else printed."""

    def __init__(self, interval: float = LOG_INTERVAL):
        self.interval = interval
        self._lock = threading.Lock()
        self._stage: str | None = None
        self._started = self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, message: str, show: bool = True) -> None:
        """Start a stage; show=False prints nothing unless it lasts: the first line is its first heartbeat."""
        with self._lock:
            if show:
                notice(message)
            self._stage, self._started = message, time.monotonic()
            self._last = self._started

    def touch(self) -> None:
        self._last = time.monotonic()

    def end(self) -> None:
        with self._lock:
            self._stage = None

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, self.interval / 4)):
            with self._lock:
                now = time.monotonic()
                if self._stage is not None and now - self._last >= self.interval:
                    notice(f"{self._stage} ({now - self._started:.0f} s)")
                    self._last = now

    def __enter__(self) -> StageLog:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="sc2deploy-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._stage = None
