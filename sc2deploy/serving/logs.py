"""The server's log lines: text or one JSON object per line, each request's lines carrying its request id.

A request's id is the client's `x-request-id` metadata when it is a sane token (1 to 128 of A-Z a-z 0-9 . _ : -),
else a fresh one; the server returns it as trailing metadata `x-request-id`. Lines about a request pass it as
`extra={"request_id": ...}`; other extras (method, code, token counts) become fields of the JSON object.
"""
from __future__ import annotations

import io
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterable
from typing import TextIO

LOG_FORMATS = ("text", "json")
REQUEST_ID_KEY = "x-request-id"
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def request_id(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The client's x-request-id if it is a sane token, else a new random one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _SANE_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


class TextFormatter(logging.Formatter):
    """`TIME LEVEL LOGGER: MESSAGE [request ID]`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [request {rid}]" if rid else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id when the line belongs
    to a request, the record's other extras, and exception when there is a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        entry.update({k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


class LogStream(io.TextIOBase):
    """A text stream whose every line becomes an INFO record of `logger`: what a command prints to stderr (start-up
    notices, progress) joins the JSON log instead of breaking it."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            if line.strip():
                self.logger.info(line.rstrip("\r"))
        return len(text)

    def flush(self) -> None:
        pass


def configure(level: str, log_format: str, stream: TextIO | None = None) -> None:
    """Log records at `level` and above to `stream` (stderr) in `log_format` (text or json)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
    if log_format == "json":
        logging.captureWarnings(True)
