"""Database-neutral planning for SQL destinations: a batch becomes set-based steps.

A batch's changes are grouped per table (in order of first appearance) and, for
tables with a primary key, coalesced by key so that each key's *last* state wins:

- insert/read/update with a full row -> the key's final row (an upsert);
- delete -> the key is absent at the end (a delete);
- an update whose before-key differs from its after-key (primary-key update) ->
  delete of the old key and upsert of the new one;
- an update with unchanged columns (TOAST values the source did not send) is merged
  into an earlier full row of the same key in the batch when there is one; otherwise
  it stays a *partial* update that writes only the sent columns;
- TRUNCATE discards the table's earlier steps of the batch and starts over.

Within one coalesced segment every key appears once, so the order in which its
deletes, upserts and partial updates are applied does not matter: a destination
runs them as a few set-based statements. Steps that cannot be coalesced (every
change of a table without primary key, a primary-key update with unchanged
columns) are kept as single-row steps, in order, between segments.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from dataflare.cdc.errors import FatalError
from dataflare.cdc.model import Batch, Change, Op, Position, Row, TableId, TableSchema


@dataclass(slots=True)
class KeyedSegment:
    """Final states of keys in a run of changes: deletes, full upserts and partial
    updates grouped by their set of unchanged (not sent) columns."""

    deletes: list[Row] = field(default_factory=list)  # key tuples
    upserts: list[Row] = field(default_factory=list)  # full rows
    partial: dict[frozenset[str], list[Row]] = field(default_factory=dict)  # rows
    # Full rows whose last change was an insert (or a snapshot read): upserts that
    # most likely find no row of their key, so a destination may try a plain load
    # first (and upsert them when a key turns out to exist).
    inserts: list[Row] = field(default_factory=list)

    def __len__(self) -> int:
        return (
            len(self.deletes)
            + len(self.upserts)
            + len(self.inserts)
            + sum(len(r) for r in self.partial.values())
        )


@dataclass(slots=True)
class InsertRows:
    """Rows appended as they are (tables without primary key)."""

    rows: list[Row]


@dataclass(slots=True)
class RowChange:
    """One change applied by itself: keyless update/delete (affects exactly one
    row equal to ``before``), or a primary-key update with unchanged columns."""

    change: Change


@dataclass(slots=True)
class Truncate:
    pass


Step = KeyedSegment | InsertRows | RowChange | Truncate


@dataclass(slots=True)
class TablePlan:
    table: TableId
    schema: TableSchema | None  # None: only a TRUNCATE of a table the batch does not describe
    steps: list[Step]
    changes: int = 0


_NOTHING: frozenset[str] = frozenset()


def _key_of(row: Row, idx: Sequence[int]) -> Row:
    return tuple(row[i] for i in idx)


def _hashable(key: Row) -> Any:
    """A dict key for key values (lists, dicts of json/array keys made hashable)."""
    try:
        hash(key)
        return key
    except TypeError:
        return repr(key)


class _KeyedPlanner:
    """Coalesces the changes of one keyed table into segments and row steps."""

    def __init__(self, schema: TableSchema) -> None:
        self.schema = schema
        self.idx = schema.key_indexes()
        self.names = schema.column_names
        self.ncols = len(self.names)
        self.single = self.idx[0] if len(self.idx) == 1 else -1
        self.steps: list[Step] = []
        # key -> (final row or None for deleted, key tuple, unchanged columns, an insert?)
        self.state: dict[Any, tuple[Row | None, Row, frozenset[str], bool]] = {}

    def flush(self) -> None:
        if not self.state:
            return
        seg = KeyedSegment()
        for row, key, unchanged, inserted in self.state.values():
            if row is None:
                seg.deletes.append(key)
            elif unchanged:
                seg.partial.setdefault(unchanged, []).append(row)
            elif inserted:
                seg.inserts.append(row)
            else:
                seg.upserts.append(row)
        self.steps.append(seg)
        self.state = {}

    def truncate(self) -> None:
        self.state = {}
        self.steps = [Truncate()]

    def add(self, c: Change) -> None:
        # Fast path: a full new row whose key did not change (nearly every change).
        op, row = c.op, c.after
        if op is not Op.DELETE and row is not None and c.before is None and not c.unchanged:
            i = self.single
            key = (row[i],) if i >= 0 else tuple(row[j] for j in self.idx)
            if len(row) == self.ncols and (op is not Op.UPDATE or c.key is None or c.key == key):
                # An insert after a delete of its key in this run is a replacement.
                hk: Any = key
                try:
                    inserted = op is not Op.UPDATE and hk not in self.state
                except TypeError:  # unhashable key values (arrays, json)
                    hk = repr(key)
                    inserted = op is not Op.UPDATE and hk not in self.state
                self.state[hk] = (row, key, _NOTHING, inserted)
                return
        self._add(c)

    def _add(self, c: Change) -> None:
        if c.op is Op.DELETE:
            key = c.key if c.key is not None else None
            if key is None:
                if c.before is None:
                    raise _bad(c, "a delete without key or old row")
                key = _key_of(c.before, self.idx)
            self.state[_hashable(key)] = (None, tuple(key), _NOTHING, False)
            return
        row = c.after
        if row is None:
            raise _bad(c, f"a {c.op.name.lower()} without a new row")
        if len(row) != len(self.names):
            raise _bad(c, f"a row of {len(row)} values for {len(self.names)} columns")
        new_key = _key_of(row, self.idx)
        unchanged = c.unchanged
        if c.op is Op.UPDATE:
            if c.before is not None:
                old_key = _key_of(c.before, self.idx)
            elif c.key is not None:
                old_key = tuple(c.key)
            else:
                old_key = new_key
        else:
            old_key = new_key
        hk_old = _hashable(old_key)
        if unchanged:
            prev = self.state.get(hk_old)
            prow = prev[0] if prev is not None else None
            if prev is not None and prow is not None:
                # Fill the columns not sent from the batch's earlier row of this key.
                punchanged = prev[2]
                row = tuple(
                    prow[i] if n in unchanged else v
                    for i, (n, v) in enumerate(zip(self.names, row, strict=True))
                )
                unchanged = unchanged & punchanged
        if old_key != new_key:
            if unchanged:
                # The unchanged values live in the sink's row of the old key: move it.
                self.flush()
                self.steps.append(RowChange(c))
                return
            self.state[hk_old] = (None, old_key, _NOTHING, False)
        hk_new = _hashable(new_key)
        inserted = c.op is not Op.UPDATE and hk_new not in self.state
        self.state[hk_new] = (row, new_key, unchanged, inserted)


def _bad(c: Change, what: str) -> FatalError:
    return FatalError(f"table {c.table}: {what} at position {c.position}; the source sent bad data")


class _KeylessPlanner:
    """Tables without primary key: a multiset; inserts in runs, the rest row by row."""

    def __init__(self, schema: TableSchema) -> None:
        self.schema = schema
        self.steps: list[Step] = []

    def flush(self) -> None:
        pass

    def truncate(self) -> None:
        self.steps = [Truncate()]

    def add(self, c: Change) -> None:
        if c.op in (Op.INSERT, Op.READ):
            if c.after is None:
                raise _bad(c, "an insert without a row")
            last = self.steps[-1] if self.steps else None
            if isinstance(last, InsertRows):
                last.rows.append(c.after)
            else:
                self.steps.append(InsertRows([c.after]))
        else:
            if c.before is None:
                raise _bad(
                    c,
                    f"a {c.op.name.lower()} without the old row on a table without primary key "
                    "(set REPLICA IDENTITY FULL on the source table)",
                )
            self.steps.append(RowChange(c))


_OP = operator.itemgetter(0)
_TABLE = operator.itemgetter(1)
_KEY = operator.itemgetter(3)
_FIRST = operator.itemgetter(0)
_BEFORE = operator.itemgetter(4)
_AFTER = operator.itemgetter(5)
_UNCHANGED = operator.itemgetter(6)
_INSERTS = frozenset({Op.INSERT, Op.READ})


def _plan_one_kind(
    changes: Sequence[Change], schemas: dict[TableId, TableSchema]
) -> list[TablePlan] | None:
    """The plan of a catch-up's typical batch, made in C-speed passes: one keyed
    table, only inserts (or only updates of full rows, keys unchanged), each key
    once. None for anything else (the coalescing planner takes it)."""
    tables = set(map(_TABLE, changes))
    if len(tables) != 1:
        return None
    table = next(iter(tables))
    schema = schemas.get(table)
    if schema is None or len(schema.key) != 1:
        return None
    ops = set(map(_OP, changes))
    inserts = ops <= _INSERTS
    if not inserts and (ops != {Op.UPDATE} or any(map(_UNCHANGED, changes))):
        return None
    if set(map(_BEFORE, changes)) != {None}:
        return None  # old rows or keys: key updates, identity full
    rows = list(map(_AFTER, changes))
    if set(map(len, rows)) != {len(schema.columns)}:
        return None
    keys = list(map(operator.itemgetter(schema.key_indexes()[0]), rows))
    try:
        if len(set(keys)) != len(keys):
            return None  # a key changed twice: coalesce
    except TypeError:
        return None  # unhashable key values (arrays, json)
    if not inserts:  # an update's own key (if given) must be its row's: no key change
        try:
            if list(map(_FIRST, map(_KEY, changes))) != keys:
                return None
        except TypeError:
            return None  # an update without key: the coalescing planner checks it
    seg = KeyedSegment(inserts=rows) if inserts else KeyedSegment(upserts=rows)
    return [TablePlan(table, schema, [seg], len(changes))]


def plan_batch(
    changes: Iterable[Change],
    schemas: dict[TableId, TableSchema],
    known: dict[TableId, TableSchema] | None = None,
) -> list[TablePlan]:
    """The steps per table of a run of changes, tables in order of first appearance.

    ``known`` holds layouts seen in earlier batches, used for tables a batch touches
    without describing them.
    """
    if isinstance(changes, list) and changes:
        fast = _plan_one_kind(changes, schemas)
        if fast is not None:
            return fast
    planners: dict[TableId, _KeyedPlanner | _KeylessPlanner | None] = {}
    plans: dict[TableId, TablePlan] = {}
    last: TableId | None = None
    planner: _KeyedPlanner | _KeylessPlanner | None = None
    plan: TablePlan | None = None
    for c in changes:
        if c.table is not last:
            last = c.table
            planner = planners.get(c.table)
            plan = plans.get(c.table)
        if plan is None:
            schema = schemas.get(c.table) or (known or {}).get(c.table)
            if schema is None and c.op is not Op.TRUNCATE:
                raise FatalError(
                    f"table {c.table}: a change arrived without the table's layout; "
                    "the source sent bad data"
                )
            plan = plans[c.table] = TablePlan(c.table, schema, [])
            if schema is None:
                planner = None
            elif schema.key:
                planner = _KeyedPlanner(schema)
            else:
                planner = _KeylessPlanner(schema)
            planners[c.table] = planner
        plan.changes += 1
        if c.op is Op.TRUNCATE:
            if planner is None:
                plan.steps = [Truncate()]
            else:
                planner.truncate()
            continue
        if planner is None:
            raise FatalError(f"table {c.table}: a change arrived without the table's layout")
        planner.add(c)
    for table, plan in plans.items():
        planner = planners[table]
        if planner is not None:
            planner.flush()
            plan.steps = planner.steps
    return list(plans.values())


class TransactionalSqlSink:
    """The write protocol shared by SQL destinations: a batch's data and its
    checkpoint commit in one target transaction; an incomplete batch (inside a large
    source transaction) leaves it open until the batch that completes it, and no other
    source may write meanwhile. Subclasses provide the database specifics."""

    label = "sql destination"  # for messages: "<label> <name>: ..."
    # A write that fails leaves nothing behind once the destination is reopened, so
    # the apply process may probe sub-batches to find a change the target refuses.
    transactional = True
    name: str
    mode: str  # upsert | append
    records_written: int
    rows_missing: int
    log: Any  # loguru logger bound to the destination
    _partial_source: str | None
    _layouts: dict[TableId, TableSchema]
    _checkpoints: dict[str, Position | None]

    def write(self, source: str, batch: Batch) -> None:
        batch = self._adapt_batch(batch)
        if self._partial_source not in (None, source):
            raise FatalError(
                f"{self.label} {self.name}: a batch of {source} arrived inside an "
                f"incomplete transaction of {self._partial_source}"
            )
        with self._translate_errors():
            if len(batch):
                if self.mode == "append":
                    self._write_append(batch)
                else:
                    self._write_upsert(batch)
                for s in batch.schemas:
                    self._layouts[s.table] = s
            if batch.complete:
                self._commit_with_checkpoint(source, batch.last)
                self._checkpoints[source] = batch.last
                self._partial_source = None
            else:
                self._partial_source = source
        self.records_written += len(batch)

    def _count_missing(self, affected: int, label: str, c: Change) -> None:
        """A keyless table's update or delete must affect exactly one equal row."""
        if affected != 1:
            self.rows_missing += 1
            self.log.warning(
                "{}: a {} found no equal row in the target (the target had diverged)",
                label,
                c.op.name.lower(),
            )

    # --- what a database provides -------------------------------------------------

    def _adapt_batch(self, batch: Batch) -> Batch:
        return batch

    def _translate_errors(self) -> AbstractContextManager[None]:
        """Roll back and turn driver errors into Retryable/FatalError."""
        raise NotImplementedError

    def _write_upsert(self, batch: Batch) -> None:
        raise NotImplementedError

    def _write_append(self, batch: Batch) -> None:
        raise NotImplementedError

    def _commit_with_checkpoint(self, source: str, position: Position) -> None:
        """Write the checkpoint in the open transaction and commit it."""
        raise NotImplementedError
