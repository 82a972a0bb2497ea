"""The shard-task contract: what one kind of per-shard work (generation, choice scoring, search, similarity,
features, ...) tells the executor, and what the executor reports back.

Its own module so that the executor (`pipeline.run.executor`), the worker actor (`pipeline.run.worker`) and
every task import it from below, and no task module imports the executor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import pyarrow as pa

from pipeline.data.adapters import Example
from pipeline.generation.models import LoadedModel
from pipeline.run.location import RunPath
from pipeline.run.rundir import RunDir, table_problem


class ShardError(Exception):
    """A shard's own input makes its task fail (e.g. a user's scorer raising on a row): the executor stops the
    run with this one-line message instead of retrying the shard, which would fail the same way."""


class ShardTask(ABC):
    """One kind of per-shard work. Instances are pickled to the workers, so keep them small and plain.

    `folder` is the task's subfolder of the run folder (one `shard=NNNNN.parquet` per shard), `schema`
    its table's exact schema, and `key_columns` the columns whose value tuples identify a row: a shard file
    is valid when its rows' keys are exactly `expected_keys(examples)`, each once.
    """

    folder: ClassVar[str]
    schema: ClassVar[pa.Schema]
    key_columns: ClassVar[tuple[str, ...]]

    @abstractmethod
    def expected_keys(self, examples: list[Example]) -> set[tuple]:
        """The key tuples a complete shard of these examples holds."""

    @abstractmethod
    def run(self, lm: LoadedModel, shard: int, examples: list[Example],
            on_tokens: Callable[[int], None] | None = None) -> pa.Table:
        """Compute the shard's table (runs inside a worker, next to the model); a task that generates tells
        `on_tokens(n)` about every n tokens as they come, for the live progress display."""

    def tokens(self, table: pa.Table) -> int:
        """Tokens the shard generated, for the progress line's tokens/s (0 for tasks that generate none)."""
        return 0

    def shard_path(self, run: RunDir, shard: int) -> RunPath:
        return run.root / self.folder / f"shard={shard:05d}.parquet"

    def shard_problem(self, run: RunDir, shard: int, examples: list[Example], job: dict[str, Any]) -> str | None:
        """Why the shard's file must be (re)computed ('missing', 'unreadable ...', ...), or None when it is whole.

        Raises ShardProblem for a file of another job `job` (see `table_problem`)."""
        return table_problem(self.shard_path(run, shard), self.schema, shard, self.key_columns,
                             self.expected_keys(examples), job)


@dataclass
class ExecSummary:
    shards: int
    skipped: int
    computed: int
    tokens: int
    seconds: float  # from the first shard handed out to the last one written
