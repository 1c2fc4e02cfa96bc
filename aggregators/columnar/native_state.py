"""``RollupState`` with the windows of the integer aggregations in compiled arrays.

With the decoder compiled, the worker's time went to the window state as Python objects
(docs/benchmarks.md: per window and fetch a key tuple, a dict lookup comparing tuples, a
cell and a set insert; per flush a ``RollupRecord``). ``meterline_native.WindowStore``
holds the sum, count, min, max and unique_count windows keyed by integer codes, with
exact ``i128`` states or a set of the distinct values; the columnar fold merges a run's
accepted events into it in log order, flushes take its changed windows as rollup column
blocks and checkpoints take its cells as JSON text, with no Python object per window.

Everything else stays the reference ``RollupState``: latest windows, and any window the
per-event code touches. The seam is ``_cells``: a miss there *lifts* a
compiled window into a Python cell (the per-event fold and ``merge_partials`` then fold
into it as always), and a window created there is marked python-owned in the store, whose
``merge`` hands such windows' events back to Python. So a window is held in exactly one
place, and the per-event code - the slow path for refused records and sums near the
range edge - runs unchanged on top of it.

A checkpoint lists the same cells in another order (compiled ones after the Python ones);
restore does not depend on the order (tests compare checkpoints decoded, cells sorted).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from meterline.aggregators.processor import cells_json
from meterline.core.aggregations import (
    Aggregator,
    Count,
    Max,
    Min,
    Sum,
    UniqueCount,
    aggregator_for,
)
from meterline.core.lateness import PartitionWatermark
from meterline.core.meters import MeterRegistry
from meterline.core.outputs import RollupBlock, RollupRecord
from meterline.core.rollup import Key, MeterPlan, RollupState, WindowKey, _Cell
from meterline.core.windows import DAY_MS, HOUR_MS

__all__ = ["NativeRollupState"]

I64 = npt.NDArray[np.int64]
# The store's aggregation codes (windows of the other aggregations stay in Python).
_CODES: dict[type, int] = {Sum: 0, Count: 1, Min: 2, Max: 3, UniqueCount: 4}
_KIND = {"hourly": 0, "daily": 1}
_SIZES = (HOUR_MS, DAY_MS)


class _Cells(dict[Key, _Cell]):
    """The windows Python holds; see the module docstring (``get`` lifts, a store marks
    python-owned)."""

    __slots__ = ("owner",)
    owner: NativeRollupState

    def get(self, key: Key, default: Any = None) -> Any:
        cell = dict.get(self, key)
        if cell is None:
            cell = self.owner._lift(key)
        return default if cell is None else cell

    def __setitem__(self, key: Key, cell: _Cell) -> None:
        dict.__setitem__(self, key, cell)
        self.owner._claim(key)


class NativeRollupState(RollupState):
    def __init__(self, allowed_lateness_ms: int, registry: MeterRegistry, store: Any) -> None:
        super().__init__(allowed_lateness_ms)
        self.store = store
        cells = _Cells()
        cells.owner = self
        self._cells = cells
        # Meters of the registry with an integer aggregation: their code, aggregator.
        self._meters: dict[str, int] = {}
        self._aggregators: list[Aggregator[Any]] = []
        for meter in registry:
            aggregator = MeterPlan(meter).aggregator
            code = _CODES.get(type(aggregator))
            if code is not None:
                self._meters[meter.name] = store.add_meter(meter.name, code)
                self._aggregators.append(aggregator)
        self._groups: dict[tuple[tuple[str, str], ...], int] = {}
        # Windows lifted while they had unflushed changes: the processor flushes them.
        self.lifted_dirty: set[Key] = set()
        self._store_len = 0  # len(store) as last read (__len__)

    # ------------------------------------------------------------------ codes

    def meter_code(self, name: str) -> int | None:
        """The store's code of a meter whose windows it holds, else None."""
        return self._meters.get(name)

    def group_code(self, group: tuple[tuple[str, str], ...]) -> int:
        code = self._groups.get(group)
        if code is None:
            code = self._groups[group] = self.store.add_group(group, orjson.dumps(group).decode())
        return code

    def _codes(self, key: Key) -> tuple[int, int, int, int, int] | None:
        window, customer, meter, group, start = key
        m = self._meters.get(meter)
        if m is None:
            return None
        return (_KIND[window], self.store.customer_code(customer), m, self.group_code(group),
                start)

    def _lift(self, key: Key) -> _Cell | None:
        codes = self._codes(key)
        if codes is None:
            return None
        held = self.store.lift(*codes)
        if held is None:
            return None
        plain, events, dirty = held
        aggregator = self._aggregators[codes[2]]
        cell = _Cell(aggregator, aggregator.from_plain(plain), events)
        dict.__setitem__(self._cells, key, cell)
        if dirty:
            self.lifted_dirty.add(key)
        return cell

    def _claim(self, key: Key) -> None:
        codes = self._codes(key)
        if codes is not None:
            self.store.lift(*codes)  # held nowhere else, so this only marks it

    def _held(self, key: Key) -> _Cell:
        """A window's cell without moving it (KeyError if not held): the readers of
        ``RollupState`` (snapshot, totals, export, the daily audit) see both places."""
        cell = dict.get(self._cells, key)
        if cell is not None:
            return cell
        codes = self._codes(key)
        held = None if codes is None else self.store.get(*codes)
        if held is None:
            raise KeyError(key)
        assert codes is not None
        aggregator = self._aggregators[codes[2]]
        return _Cell(aggregator, aggregator.from_plain(held[0]), held[1])

    # ------------------------------------------------------------------ the fold's seam

    def merge_columns(self, customer: I64, meter: I64, group: I64, ts: I64, qty: I64,
                      positions: I64, values: list[str | None]) -> tuple[I64, I64]:
        """Fold accepted events (store codes) in log order; ``values[positions[i]]`` is
        event i's unique_count value. Returns the indexes of the events whose hourly /
        daily window Python holds (fold those with the Python code)."""
        hourly, daily = self.store.merge(
            *(np.ascontiguousarray(a, dtype=np.int64)
              for a in (customer, meter, group, ts, qty, positions)), values)
        return np.frombuffer(hourly, dtype=np.int64), np.frombuffer(daily, dtype=np.int64)

    def take_blocks(self, source: str, partition: int, rows: Iterable[RollupRecord] = ()
                    ) -> list[RollupBlock]:
        """The compiled windows changed since the last call, plus ``rows`` (the Python-held
        windows' records, all of this source partition), as one block per window kind."""
        taken: dict[str, list[list[Any]]] = {}
        buffers: dict[str, tuple[Any, int]] = {}
        for block in self.store.take_dirty():
            if block is not None:
                window, *columns, buffered = block
                taken[window] = [[window] * len(columns[0]), *columns]
                buffers[window] = ({"raw": buffered}, len(columns[0]))
        for r in rows:
            columns = taken.get(r.window)
            if columns is None:
                columns = taken[r.window] = [[] for _ in range(9)]
            for column, value in zip(columns, (r.window, r.customer, r.meter, r.group,
                                               r.window_start_ms, r.window_end_ms,
                                               r.aggregation, r.value_nanos, r.events),
                                     strict=True):
                column.append(value)
        blocks = []
        for window, customer, meter, group, start, end, aggregation, value, events in (
                taken.values()):
            buffered, rows_buffered = buffers.get(window[0], (None, 0))
            blocks.append(RollupBlock(source, partition, window, customer, meter, group,
                                      start, end, aggregation, value, events, events,
                                      buffered, rows_buffered))
        return blocks

    def pending_windows(self, dirty: set[Key]) -> int:
        """Changed windows not yet taken and not in ``dirty`` (the processor's set):
        compiled ones and lifted ones."""
        lifted = len(self.lifted_dirty - dirty) if self.lifted_dirty else 0
        return int(self.store.dirty_count()) + lifted

    # ------------------------------------------------------------------ RollupState

    def __len__(self) -> int:
        """Open windows. Read from other threads too (the metrics scrape): while the fold
        merges, the store is mutably borrowed with the GIL released and refuses a read
        (RuntimeError), so the count is then the one last seen, not an error (a /metrics
        500 under load in CI, 2026-12-02)."""
        with contextlib.suppress(RuntimeError):
            self._store_len = len(self.store)
        return len(self._cells) + self._store_len

    def window_keys(self) -> list[WindowKey]:
        return [*super().window_keys(), *map(WindowKey._make, self.store.window_keys())]

    def evict_closed(self, watermark: PartitionWatermark, *, keys: bool = True
                     ) -> list[WindowKey]:
        limit = self.closed_limit(watermark)
        closed = super().evict_closed(watermark, keys=keys)
        if keys:
            closed += [WindowKey._make(k) for k in self.store.window_keys()
                       if k[4] + _SIZES[_KIND[k[0]]] <= limit]
        self.store.evict(limit)
        return closed

    def max_abs_total(self) -> int:
        return max(super().max_abs_total(), int(self.store.max_abs_sum()))

    def export_all(self) -> list[list[Any]]:
        return [*super().export_all(), *orjson.loads(b"[" + self.store.export_json() + b"]")]

    def cells_json(self) -> bytes:
        """``export_all`` as checkpoint JSON text: the compiled windows' text is written
        by the store."""
        python = cells_json(super().export_all())
        native = self.store.export_json()
        if not native:
            return python
        if python == b"[]":
            return b"[" + native + b"]"
        return python[:-1] + b"," + native + b"]"

    def restore(self, key: Key, aggregation: str, plain: Any, events: int) -> None:
        codes = self._codes(key)
        if (codes is not None and type(events) is int
                and type(aggregator_for(aggregation)) is type(self._aggregators[codes[2]])
                and (type(plain) is int if aggregation != UniqueCount.name
                     else type(plain) is list and all(type(v) is str for v in plain))):
            self.store.restore(*codes, plain, events)
        else:  # kept in Python (and marked python-owned in the store)
            super().restore(key, aggregation, plain, events)

