"""Progress on stderr for long commands: a bar on a terminal, plain lines every few seconds when piped,
and stage lines with a heartbeat (StageLog)."""
from __future__ import annotations

import sys
import threading
import time

from sc2deploy.commands.common import notice

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
