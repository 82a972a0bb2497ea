"""What a person watching `dynoracle run` sees: a live bar in a terminal, one line per shard elsewhere.

Workers report the tokens each engine call's row groups generate (the engine's `on_group_done`) to a
small async Ray actor, `ProgressCounter`; in a terminal a driver thread waits on it for each new report
and redraws the bar at once, so the bar's token count, tokens/s and ETA move while a shard runs. Without
a terminal (`ray job logs`, a pipe, a file) there is no counter and each finished shard prints one plain
line on stderr, as before.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any, Callable

import ray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn

WAIT_S = 1.0  # longest a driver's wait for a report lasts, so that it notices the end of the run


class ProgressCounter:
    """Async Ray actor: tokens generated so far by each running shard, as its worker reports them."""

    def __init__(self) -> None:
        self.tokens: dict[int, int] = {}
        self.version = 0  # reports so far
        self._reported = asyncio.Condition()

    async def add(self, shard: int, tokens: int) -> None:
        async with self._reported:
            self.tokens[shard] = self.tokens.get(shard, 0) + tokens
            self.version += 1
            self._reported.notify_all()

    async def after(self, version: int, timeout: float) -> tuple[int, dict[int, int]]:
        """(version, tokens per shard) once there are reports beyond `version`, or after `timeout` seconds."""
        async with self._reported:
            try:
                await asyncio.wait_for(self._reported.wait_for(lambda: self.version > version), timeout)
            except asyncio.TimeoutError:
                pass
            return self.version, dict(self.tokens)


def shard_reporter(counter: Any, shard: int) -> Callable[[int], None] | None:
    """The engine callback that tells `counter` (a ProgressCounter actor handle, or None) about `shard`'s tokens."""
    if counter is None:
        return None
    return lambda tokens: counter.add.remote(shard, tokens)


class RunProgress:
    """Shards done/total, sequences, generated tokens (and per second), ETA: live or one line per shard.

    Use as a context manager around the dispatch. The counter actor exists only when `live` (stderr is a
    terminal); while the bar shows, rich moves whatever is printed on stderr above it.
    """

    def __init__(self, total_shards: int, skipped: int, todo_sequences: int):
        self.total, self.done = total_shards, skipped
        self.todo_sequences, self.sequences, self.tokens = todo_sequences, 0, 0
        self.finished: set[int] = set()
        self.start = time.monotonic()
        self.console = Console(stderr=True)
        self.live = self.console.is_terminal
        self.counter: Any = None
        self._running: dict[int, int] = {}  # the counter's last answer: tokens per shard reported so far
        self._stop = threading.Event()
        self._bar: Progress | None = None

    def __enter__(self) -> RunProgress:
        if self.live:
            self.counter = ray.remote(ProgressCounter).options(num_cpus=0).remote()
            self._bar = Progress(SpinnerColumn(), TextColumn("shards {task.fields[shards]}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("sequences | {task.fields[tokens]:,} tokens, "
                                                                  "{task.fields[rate]:.0f} tok/s | ETA"),
                                 TimeRemainingColumn(), console=self.console, refresh_per_second=8)
            self._task = self._bar.add_task("run", total=self.todo_sequences, shards=f"{self.done}/{self.total}",
                                            tokens=0, rate=0.0)
            self._bar.start()
            self._follower = threading.Thread(target=self._follow, name="dynoracle-progress", daemon=True)
            self._follower.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._stop.set()
            self._follower.join()
            self._refresh()
            self._bar.stop()
            ray.kill(self.counter)

    def shard_done(self, shard: int, worker: int, sequences: int, tokens: int, seconds: float) -> None:
        """Count a finished shard (its exact tokens from its table) and report it."""
        self.done += 1
        self.sequences += sequences
        self.tokens += tokens
        self.finished.add(shard)
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.sequences / elapsed
        eta = (self.todo_sequences - self.sequences) / rate if rate else 0.0
        speed = f" | {self.tokens / elapsed:.0f} tok/s" if self.tokens else ""  # tasks that generate nothing
        print(f"shard {shard:05d} done by worker {worker} in {seconds:.1f} s | {self.done}/{self.total} shards | "
              f"{rate:.2f} seq/s{speed} | ETA {_clock(eta)}", file=sys.stderr, flush=True)
        if self._bar is not None:
            self._refresh()

    def _follow(self) -> None:
        """Redraw the bar on every report of the counter, until the dispatch ends."""
        version = 0
        while not self._stop.is_set():
            try:
                version, running = ray.get(self.counter.after.remote(version, WAIT_S), timeout=WAIT_S + 30)
            except Exception:  # noqa: BLE001 - a late or lost answer only delays the bar
                continue
            self._running = running
            self._refresh()

    def _refresh(self) -> None:
        """Finished shards' exact tokens plus what the running ones have reported so far."""
        tokens = self.tokens + sum(n for shard, n in self._running.items() if shard not in self.finished)
        elapsed = max(time.monotonic() - self.start, 1e-9)
        self._bar.update(self._task, completed=self.sequences, shards=f"{self.done}/{self.total}", tokens=tokens,
                         rate=tokens / elapsed)
        self._bar.refresh()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
