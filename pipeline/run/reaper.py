"""A watchdog that ends a private Ray's processes when its driver dies without shutting Ray down.

Ray's own fate-sharing kills the GCS and raylet with the driver, but the raylet's children (the dashboard
and runtime-env agents, idle workers) first try to report the raylet's death to the dead GCS and linger
for a minute or more. So the processes a private Ray starts carry a mark in their environment (set only
while `ray.init` spawns them; the raylet passes it on to the workers and agents it starts), and a small
watchdog process, holding the read end of a pipe whose write end only the driver holds, SIGKILLs every
process still carrying the mark once that pipe closes: when the driver exits, however it exits. Linux
only (it reads /proc); elsewhere it does nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from contextlib import contextmanager
from typing import Iterator

MARK = "DYNORACLE_RAY_OWNER"
_WATCHDOG = """
import os, signal, sys
token = sys.argv[1]
sys.stdin.buffer.read()  # returns when the driver's end of the pipe closes
needle = ("%s=" + token).encode()
for _ in range(2):  # twice: a process may have been starting during the first sweep
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if needle in handle.read().split(b"\\0"):
                    os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
""" % MARK


class Reaper:
    """The watchdog of one private Ray: `marking()` around `ray.init`, `close()` once Ray is shut down."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex
        self._write = None
        if not os.path.isdir("/proc"):
            return
        read, self._write = os.pipe()  # not inherited: Ray's processes must not keep the pipe open
        env = {k: v for k, v in os.environ.items() if k != MARK}
        subprocess.Popen([sys.executable, "-c", _WATCHDOG, self.token], stdin=read, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(read)

    @contextmanager
    def marking(self) -> Iterator[None]:
        """Processes started inside carry the mark (and pass it to theirs); this process's own environment
        has it only meanwhile."""
        os.environ[MARK] = self.token
        try:
            yield
        finally:
            os.environ.pop(MARK, None)

    def close(self) -> None:
        """Let the watchdog end whatever still carries the mark (nothing, after a clean `ray.shutdown`)."""
        if self._write is not None:
            os.close(self._write)
            self._write = None
