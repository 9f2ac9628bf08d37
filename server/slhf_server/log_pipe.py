"""Every line on the process's stdout and stderr as one JSON object (``SLHF_LOG_FORMAT=json``).

Logging handlers write JSON already, but not everything goes through Python's logging: torch's
C++ warnings, tqdm's progress bars, ``print`` in a library, the output of vLLM's engine
processes. ``StdioJsonPipe`` points file descriptors 1 and 2 (inherited by child processes)
at a pipe; a thread reads it and writes each line to the real stderr -- a JSON object as is,
anything else wrapped as ``{"ts", "level", "logger": "stderr", "message"}``.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time

_WARNING = re.compile(r"warn", re.IGNORECASE)
_ERROR = re.compile(r"error|traceback|exception", re.IGNORECASE)


def as_json_line(line: str) -> str:
    """``line`` if it is a JSON object, else a JSON log object whose message is ``line``."""
    if line.startswith("{"):
        try:
            if isinstance(json.loads(line), dict):
                return line
        except ValueError:
            pass
    now = time.time()
    level = "error" if _ERROR.search(line) else "warning" if _WARNING.search(line) else "info"
    entry = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
        "level": level,
        "logger": "stderr",
        "message": line,
    }
    return json.dumps(entry, ensure_ascii=False)


def split_lines(buffer: bytes) -> tuple[list[str], bytes]:
    """Complete lines of ``buffer`` (ended by ``\\n`` or ``\\r``, as progress bars redraw), blank
    ones dropped, and the incomplete rest."""
    parts = re.split(rb"[\r\n]", buffer)
    rest = parts.pop()
    lines = [p.decode("utf-8", "replace").rstrip() for p in parts]
    return [ln for ln in lines if ln.strip()], rest


class StdioJsonPipe:
    def __init__(self) -> None:
        self._out = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        self._thread = threading.Thread(
            target=self._pump, args=(read_end,), name="slhf-stdio-json", daemon=True
        )
        self._thread.start()

    def _write(self, lines: list[str]) -> None:
        data = "".join(as_json_line(ln) + "\n" for ln in lines).encode("utf-8", "replace")
        while data:
            data = data[os.write(self._out, data) :]

    def _pump(self, read_end: int) -> None:
        rest = b""
        while chunk := os.read(read_end, 65536):
            lines, rest = split_lines(rest + chunk)
            self._write(lines)
        if rest.strip():
            self._write([rest.decode("utf-8", "replace").rstrip()])
        os.close(read_end)

    def close(self, timeout_s: float = 1.0) -> None:
        """Point stdout and stderr back at the real stderr and write what is still in the pipe
        (waiting at most ``timeout_s`` for child processes that still hold it)."""
        os.dup2(self._out, 1)
        os.dup2(self._out, 2)
        self._thread.join(timeout_s)


_active: StdioJsonPipe | None = None


def install() -> None:
    """Route this process's (and its future children's) stdout and stderr through the pipe."""
    global _active
    if _active is None:
        _active = StdioJsonPipe()


def close() -> None:
    global _active
    if _active is not None:
        _active.close()
        _active = None
