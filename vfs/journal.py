"""The journal: local operations the server has not acknowledged yet, and how they fold.

Every metadata or content change the kernel makes through the drive is one
row in the `journal` table (see `vfs/schema.py`), appended and committed
before the FUSE request answers, so a change whose close()/fsync() returned
survives `kill -9` (invariant 1). The uploader (`vfs/sync/push.py`) reads the
pending rows in order, folds them with `coalesce()` into the smallest list of
operations with the same effect, sends those, and only then deletes the rows
(`ack`).

Coalescing is a pure function of the ordered ops so it can be unit-tested and
so that a replay after a crash folds the same rows the same way. Its rules:

- content: every `write` of an entry folds into one upload; content is read
  from the working copy at push time, so the latest bytes win. A write of an
  entry created in the same batch folds into that `create`.
- attributes: `setattr`s fold into the entry's `create` or into one setattr,
  later values winning.
- created then deleted (or replaced by a rename): nothing is sent, unless
  another op still names the entry as its parent.
- deleted: writes and setattrs before the delete are not sent; a rename just
  before the delete is dropped when nothing else moved in between.
- renames: a rename folds into the entry's previous create or rename when no
  other entry was created, moved or deleted in between (so no name can have
  changed hands) and the earlier op replaced nothing; folded renames that put
  the entry back where its first rename took it from (`from_parent`,
  `from_name`) cancel out.
- everything else keeps its order.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from vfs.schema import transaction

log = logging.getLogger(__name__)

OP_KINDS = frozenset({"create", "write", "rename", "setattr", "delete"})
#: Ops that change which name points at which entry; other entries' renames can
#: only be folded across ops that are not structural.
STRUCTURAL = frozenset({"create", "rename", "delete"})


@dataclass(frozen=True, slots=True)
class JournalOp:
    """One row of the journal, as the filesystem appended it."""

    seq: int
    kind: str
    entry_id: str
    args: dict[str, Any]
    created_ns: int = 0


@dataclass(slots=True)
class PlannedOp:
    """One operation to send, standing for the journal rows in `seqs`.

    `kind` is a journal kind. A `create` of a file with `content=True` carries
    the working copy's content; a `write` always does.
    """

    kind: str
    entry_id: str
    args: dict[str, Any]
    seqs: list[int]
    content: bool = False

    @property
    def structural(self) -> bool:
        return self.kind in STRUCTURAL


@dataclass(slots=True)
class Plan:
    """The folded form of a run of journal rows.

    `ops` are to be sent in order; `dropped` are rows whose effect cancelled
    out (created then deleted) and can be acknowledged without sending.
    """

    ops: list[PlannedOp] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    #: Entries that were given a planned delete (some may have vanished since): lets the
    #: writes and setattrs of the rest skip a scan of the whole plan (quadratic in an untar).
    deleted: set[str] = field(default_factory=set)

    def delete_index(self, entry_id: str) -> int | None:
        """Index of the entry's planned delete, if it has one."""
        return _index_of(self, entry_id, ["delete"]) if entry_id in self.deleted else None


@dataclass(frozen=True, slots=True)
class InflightBatch:
    """A commit recorded by `Journal.begin_batch` and not yet finished."""

    key: str
    seqs: list[int]
    request: dict[str, Any]


@dataclass(frozen=True, slots=True)
class JournalStatistics:
    ops: int
    entries: int
    oldest_ns: int | None


# --- coalescing (pure) ------------------------------------------------------------


def coalesce(ops: Sequence[JournalOp]) -> Plan:
    """Fold `ops` (in journal order) into the shortest plan with the same effect.

    Every input seq ends up in exactly one planned op or in `plan.dropped`.
    """
    plan = Plan()
    for op in ops:
        if op.kind not in OP_KINDS:
            raise ValueError(f"journal row {op.seq} has unknown kind {op.kind!r}")
        _FOLD[op.kind](plan, op)
    return plan


def _index_of(plan: Plan, entry_id: str, kinds: Iterable[str]) -> int | None:
    """Index of the last planned op of `entry_id` whose kind is one of `kinds`."""
    wanted = set(kinds)
    for i in range(len(plan.ops) - 1, -1, -1):
        p = plan.ops[i]
        if p.entry_id == entry_id and p.kind in wanted:
            return i
    return None


def _moved_since(plan: Plan, index: int, entry_id: str) -> bool:
    """True if an entry other than `entry_id` changed names after plan.ops[index]."""
    return any(p.structural and p.entry_id != entry_id for p in plan.ops[index + 1 :])


def _is_parent_elsewhere(plan: Plan, entry_id: str) -> bool:
    """True if a planned op of another entry places something inside `entry_id`."""
    return any(p.entry_id != entry_id and p.args.get("parent") == entry_id for p in plan.ops)


def _fold_create(plan: Plan, op: JournalOp) -> None:
    plan.ops.append(PlannedOp("create", op.entry_id, dict(op.args), [op.seq]))


def _fold_write(plan: Plan, op: JournalOp) -> None:
    deleted = plan.delete_index(op.entry_id)
    if deleted is not None:
        # A write after the delete (a file unlinked while open): nothing to keep on the server.
        plan.ops[deleted].seqs.append(op.seq)
        return
    i = _index_of(plan, op.entry_id, ["create", "write"])
    if i is None:
        plan.ops.append(PlannedOp("write", op.entry_id, {}, [op.seq], content=True))
        return
    plan.ops[i].seqs.append(op.seq)
    plan.ops[i].content = True


def _fold_setattr(plan: Plan, op: JournalOp) -> None:
    i = _index_of(plan, op.entry_id, ["create", "setattr"])
    if i is None or plan.delete_index(op.entry_id) is not None:
        plan.ops.append(PlannedOp("setattr", op.entry_id, dict(op.args), [op.seq]))
        return
    target = plan.ops[i]
    target.args.update({k: v for k, v in op.args.items() if v is not None})
    target.seqs.append(op.seq)


def _fold_rename(plan: Plan, op: JournalOp) -> None:
    args = dict(op.args)
    seqs = [op.seq]
    replaced = args.get("replaced")
    if replaced:
        # The rename deletes the entry it replaced: fold that deletion first.
        if _vanish(plan, replaced, []):
            args["replaced"] = None
        else:
            # Its renames stay: the replacing rename expects it at the target name.
            _drop_before_delete(plan, replaced, seqs, renames=False)
    i = _index_of(plan, op.entry_id, ["create", "rename"])
    if i is not None and not _moved_since(plan, i, op.entry_id):
        earlier = plan.ops[i]
        # A rename that replaces never folds into an earlier one: the fold would run it
        # where the earlier rename was, before whatever emptied the entry it replaces --
        # maybe that very rename, moving the entry out of the folder it now replaces.
        can_fold = not args.get("replaced") and (
            earlier.kind == "create"
            or (earlier.kind == "rename" and not earlier.args.get("replaced"))
        )
        if can_fold and _returns_home(earlier, args):
            # Moved away and back (a backup~ that became the saved file again): nothing moved.
            plan.ops.pop(i)
            plan.dropped.extend(earlier.seqs + seqs)
            return
        if can_fold:  # neither replaces anything: only the target changes
            earlier.args["parent"] = args["parent"]
            earlier.args["name"] = args["name"]
            earlier.seqs.extend(seqs)
            return
    plan.ops.append(PlannedOp("rename", op.entry_id, args, seqs))


def _returns_home(earlier: PlannedOp, args: dict[str, Any]) -> bool:
    """True if folding `args` into the rename `earlier` puts the entry back where it was."""
    return (
        earlier.kind == "rename"
        and not args.get("replaced")
        and "from_parent" in earlier.args
        and (earlier.args["from_parent"], earlier.args.get("from_name"))
        == (args["parent"], args["name"])
    )


def _fold_delete(plan: Plan, op: JournalOp) -> None:
    seqs = [op.seq]
    if _vanish(plan, op.entry_id, seqs):
        plan.dropped.extend(seqs)
        return
    _drop_before_delete(plan, op.entry_id, seqs)
    plan.ops.append(PlannedOp("delete", op.entry_id, dict(op.args), seqs))
    plan.deleted.add(op.entry_id)


def _vanish(plan: Plan, entry_id: str, seqs: list[int]) -> bool:
    """Remove every op of an entry created in this plan, if nothing else depends on it.

    The removed seqs go to `plan.dropped`; returns True if the entry vanished.
    """
    if _index_of(plan, entry_id, ["create"]) is None or _is_parent_elsewhere(plan, entry_id):
        return False
    kept: list[PlannedOp] = []
    for p in plan.ops:
        if p.entry_id != entry_id:
            kept.append(p)
        elif p.kind == "rename" and p.args.get("replaced"):
            # The vanished entry pushed a server entry out of the way: that delete stays.
            base = {"base": p.args["replaced_base"]} if "replaced_base" in p.args else {}
            kept.append(PlannedOp("delete", p.args["replaced"], base, p.seqs))
            plan.deleted.add(p.args["replaced"])
        else:
            plan.dropped.extend(p.seqs)
    plan.ops[:] = kept
    plan.dropped.extend(seqs)
    seqs.clear()
    return True


def _drop_before_delete(
    plan: Plan, entry_id: str, seqs: list[int], *, renames: bool = True
) -> None:
    """Fold an existing entry's pending content, attributes and trailing renames into its delete."""
    kept: list[PlannedOp] = []
    for p in plan.ops:
        if p.entry_id == entry_id and p.kind in ("write", "setattr"):
            seqs.extend(p.seqs)
        else:
            kept.append(p)
    plan.ops[:] = kept
    while renames:
        i = _index_of(plan, entry_id, ["rename"])
        if i is None or _moved_since(plan, i, entry_id) or plan.ops[i].args.get("replaced"):
            break
        seqs.extend(plan.ops.pop(i).seqs)
    seqs.sort()


_FOLD = {
    "create": _fold_create,
    "write": _fold_write,
    "setattr": _fold_setattr,
    "rename": _fold_rename,
    "delete": _fold_delete,
}


def split_batches(plan_ops: Sequence[PlannedOp], max_ops: int) -> list[list[PlannedOp]]:
    """Cut planned ops into commit batches that keep order, hold at most `max_ops` ops
    and never name one entry twice (the second op's base revision is only known
    once the first is committed)."""
    batches: list[list[PlannedOp]] = []
    current: list[PlannedOp] = []
    ids: set[str] = set()
    for p in plan_ops:
        touched = {p.entry_id} | ({p.args["replaced"]} if p.args.get("replaced") else set())
        if current and (len(current) >= max_ops or touched & ids):
            batches.append(current)
            current, ids = [], set()
        current.append(p)
        ids |= touched
    if current:
        batches.append(current)
    return batches


# --- the table ------------------------------------------------------------------


class Journal:
    """The `journal` table on the drive's state.db connection.

    All methods are short SQLite statements meant for the trio thread; `append`
    commits before it returns, so the row is durable once the database runs
    with `synchronous=FULL` (set by the schema).
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._appended = trio.Event()
        self._flush_requested = trio.Event()
        self.changes = 0  # appends and acks so far, for waiters that only need to know "any?"

    def append(self, kind: str, entry_id: str, /, **args: Any) -> int:
        """Record one local operation durably and wake the uploader; returns its seq.

        Inside a caller's transaction (the filesystem journals in the same
        transaction as its mirror change) the row commits with it. A delete
        records the entry's revision as `base`, and a rename that replaced an
        entry records that entry's revision as `replaced_base`: the rows they
        come from may be gone from the mirror by the time the uploader runs.
        """
        if kind not in OP_KINDS:
            raise ValueError(f"unknown journal op kind {kind!r} for entry {entry_id}")
        if kind == "delete" and "base" not in args:
            args["base"] = self._revision(entry_id)
        if kind == "rename" and args.get("replaced") and "replaced_base" not in args:
            args["replaced_base"] = self._revision(args["replaced"])
        with transaction(self._db):
            cur = self._db.execute(
                "INSERT INTO journal (kind, entry_id, args, created_ns) VALUES (?, ?, ?, ?)",
                (kind, entry_id, json.dumps(args, sort_keys=True), time.time_ns()),
            )
        seq = int(cur.lastrowid or 0)
        log.debug("journal %d: %s %s %r", seq, kind, entry_id, args)
        self._wake()
        return seq

    def _revision(self, entry_id: str) -> int:
        row = self._db.execute("SELECT revision FROM mirror WHERE id = ?", (entry_id,)).fetchone()
        return int(row[0]) if row else 0

    def pending(self, limit: int | None = None) -> list[JournalOp]:
        """The unacknowledged ops in the order they happened (at most `limit`)."""
        sql = "SELECT seq, kind, entry_id, args, created_ns FROM journal ORDER BY seq"
        params: tuple[int, ...] = ()
        if limit is not None:
            sql += " LIMIT ?"
            params = (limit,)
        return [
            JournalOp(seq, kind, entry_id, json.loads(args), created_ns)
            for seq, kind, entry_id, args, created_ns in self._db.execute(sql, params)
        ]

    def ack(self, seqs: Iterable[int]) -> None:
        """Forget ops the server has committed (or that cancelled out)."""
        rows = [(s,) for s in seqs]
        if not rows:
            return
        with transaction(self._db):
            self._db.executemany("DELETE FROM journal WHERE seq = ?", rows)
        self._wake()

    def amend(self, seqs: Iterable[int], entry_id: str, **changes: Any) -> None:
        """Change where `entry_id`'s create/rename rows among `seqs` put it (conflict resolution).

        Rows keep their place in the order, so nothing that depends on them moves.
        """
        wanted = list(seqs)
        rows = self._db.execute(
            f"SELECT seq, args FROM journal WHERE entry_id = ? AND kind IN ('create', 'rename')"
            f" AND seq IN ({','.join('?' * len(wanted))})",
            (entry_id, *wanted),
        ).fetchall()
        with transaction(self._db):
            for seq, args in rows:
                self._db.execute(
                    "UPDATE journal SET args = ? WHERE seq = ?",
                    (json.dumps({**json.loads(args), **changes}, sort_keys=True), seq),
                )
        self._wake()

    def is_empty(self) -> bool:
        return self._db.execute("SELECT 1 FROM journal LIMIT 1").fetchone() is None

    def pending_for(self, entry_id: str) -> bool:
        """True if the entry has local changes the server has not acknowledged."""
        row = self._db.execute(
            "SELECT 1 FROM journal WHERE entry_id = ? OR json_extract(args, '$.replaced') = ? LIMIT 1",
            (entry_id, entry_id),
        ).fetchone()
        return row is not None

    def first_rename(self, entry_id: str) -> JournalOp | None:
        """The oldest pending rename of the entry (its args name where it came from)."""
        row = self._db.execute(
            "SELECT seq, kind, entry_id, args, created_ns FROM journal"
            " WHERE entry_id = ? AND kind = 'rename' ORDER BY seq LIMIT 1",
            (entry_id,),
        ).fetchone()
        if row is None:
            return None
        seq, kind, entry, args, created_ns = row
        return JournalOp(seq, kind, entry, json.loads(args), created_ns)

    def has_pending_write(self, entry_id: str, *, after: int = 0) -> bool:
        """True if a content change of the entry newer than seq `after` is waiting."""
        row = self._db.execute(
            "SELECT 1 FROM journal WHERE entry_id = ? AND seq > ? AND kind IN ('write', 'create')"
            " LIMIT 1",
            (entry_id, after),
        ).fetchone()
        return row is not None

    def last_content_seqs(self, entry_ids: Iterable[str]) -> dict[str, int]:
        """The newest pending `write`/`create` seq of each of `entry_ids` that has one.

        `has_pending_write` for a whole commit batch in one query: the journal has
        no index on entry_id (an index would cost every append a page), so one
        query per entry was a scan of the journal per file, on the trio thread.
        """
        wanted = set(entry_ids)
        if not wanted:
            return {}
        rows = self._db.execute(
            "SELECT entry_id, MAX(seq) FROM journal WHERE kind IN ('write', 'create')"
            " GROUP BY entry_id"
        )
        return {entry_id: seq for entry_id, seq in rows if entry_id in wanted}

    def content_seqs(self, entry_id: str) -> list[int]:
        """The pending `write` rows of the entry (settled together when its content is
        committed some other way, as a conflict copy)."""
        return [
            seq
            for (seq,) in self._db.execute(
                "SELECT seq FROM journal WHERE entry_id = ? AND kind = 'write' ORDER BY seq",
                (entry_id,),
            )
        ]

    def statistics(self) -> JournalStatistics:
        ops, entries, oldest = self._db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT entry_id), MIN(created_ns) FROM journal"
        ).fetchone()
        return JournalStatistics(int(ops), int(entries), oldest)

    def pending_bytes(self) -> int:
        """Bytes of content waiting for upload: sizes of entries with a pending create or write."""
        row = self._db.execute(
            "SELECT COALESCE(SUM(size), 0) FROM mirror WHERE id IN"
            " (SELECT entry_id FROM journal WHERE kind IN ('create', 'write'))"
        ).fetchone()
        return int(row[0])

    # --- the uploader's idempotency keys ---

    def begin_batch(self, key: str, seqs: Sequence[int], request: dict[str, Any]) -> None:
        """Remember, durably and before it is sent, a commit for journal rows `seqs`.

        `request` is everything needed to send the same commit again (its ops)
        and to apply its answer. If the client dies before `end_batch`, the next
        run sends exactly this request with the same key: the server answers a
        retry of an applied commit with its stored result instead of applying it twice.
        """
        value = json.dumps({"seqs": sorted(seqs), "request": request}, sort_keys=True)
        with transaction(self._db):
            self._db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (f"inflight:{key}", value)
            )

    def end_batch(self, key: str) -> None:
        with transaction(self._db):
            self._db.execute("DELETE FROM meta WHERE key = ?", (f"inflight:{key}",))

    def inflight_batches(self) -> list[InflightBatch]:
        """Commits started but not finished (by a client that died), oldest first."""
        rows = self._db.execute(
            "SELECT key, value FROM meta WHERE key LIKE 'inflight:%' ORDER BY rowid"
        ).fetchall()
        out = []
        for key, value in rows:
            data = json.loads(value)
            out.append(InflightBatch(key.removeprefix("inflight:"), data["seqs"], data["request"]))
        return out

    # --- waking the uploader ---

    async def wait_nonempty(self) -> None:
        """Return once at least one op is pending."""
        while self.is_empty():
            await self.wait_appended()

    async def wait_empty(self) -> None:
        """Return once every op has been acknowledged."""
        while not self.is_empty():
            await self.wait_appended()

    async def wait_appended(self) -> None:
        """Return at the next append or ack."""
        await self._appended.wait()

    def request_flush(self) -> None:
        """Ask the uploader to skip its write-back delay (`ferry sync`, unmount)."""
        self._flush_requested.set()

    @property
    def flush_requested(self) -> bool:
        return self._flush_requested.is_set()

    async def wait_flush_requested(self) -> None:
        await self._flush_requested.wait()

    def clear_flush_request(self) -> None:
        if self._flush_requested.is_set():
            self._flush_requested = trio.Event()

    def _wake(self) -> None:
        self.changes += 1
        self._appended.set()
        self._appended = trio.Event()
