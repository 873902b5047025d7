"""A serving process's output: whole lines, never mixed.

The scaler reads a replica's stdout and stderr from one pipe, line by line. Python's
``sys.stdout`` and ``sys.stderr`` are two unlocked streams over it, and a pipe keeps a write
whole only up to 4 KiB: a predictor's long ``print()`` and a log record from another thread
(Celery connecting its remote control, say) came out interleaved, one line cut in two with
the log record inside. :class:`Lines` gathers each thread's text up to its newline and
writes each line in one go, under a lock the two streams share.
"""

from __future__ import annotations

import io
import os
import sys
import threading

_LOCK = threading.Lock()  # one line at a time, stdout and stderr together


class Lines(io.TextIOBase):
    """A text stream over ``fd`` that writes whole lines, each thread's its own."""

    def __init__(self, fd: int, name: str) -> None:
        super().__init__()
        self._fd = fd
        self._name = name
        self._pending = threading.local()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return "backslashreplace"

    @property
    def name(self) -> str:
        return self._name

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        pending = getattr(self._pending, "text", "") + text
        end = pending.rfind("\n") + 1
        self._pending.text = pending[end:]
        if end:
            self._write(pending[:end])
        return len(text)

    def flush(self) -> None:
        """Write this thread's unfinished line too (a ``print(..., end="")`` then ``flush``)."""
        pending = getattr(self._pending, "text", "")
        if pending:
            self._pending.text = ""
            self._write(pending)

    def _write(self, text: str) -> None:
        data = memoryview(text.encode("utf-8", "backslashreplace"))
        with _LOCK:
            while data:  # a pipe may take a large write in parts
                data = data[os.write(self._fd, data):]


def whole_lines() -> None:
    """Make this process's ``sys.stdout`` and ``sys.stderr`` write whole lines (see the
    module doc); text written before is flushed first."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    sys.stdout = Lines(1, "<stdout>")
    sys.stderr = Lines(2, "<stderr>")
