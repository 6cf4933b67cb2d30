"""Unit tests for vfs/journal.py: coalescing rules (pure) and the journal table."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio

from vfs.journal import Journal, JournalOp, Plan, coalesce, split_batches
from vfs.schema import open_db

ROOT = "0" * 32
A, B, C, D = ("a" * 32, "b" * 32, "c" * 32, "d" * 32)


def ops(*rows: tuple[str, str, dict]) -> list[JournalOp]:
    return [JournalOp(i + 1, kind, eid, args) for i, (kind, eid, args) in enumerate(rows)]


def create(eid: str, name: str, parent: str = ROOT, kind: str = "file") -> tuple[str, str, dict]:
    return (
        "create",
        eid,
        {"parent": parent, "name": name, "kind": kind, "mode": 0o644, "mtime_ns": 1},
    )


def summary(plan: Plan) -> list[tuple]:
    return [(p.kind, p.entry_id, p.content, sorted(p.seqs)) for p in plan.ops]


def all_seqs(plan: Plan) -> list[int]:
    return sorted([s for p in plan.ops for s in p.seqs] + plan.dropped)


def test_many_writes_upload_once():
    plan = coalesce(ops(("write", A, {}), ("write", A, {}), ("write", A, {})))
    assert summary(plan) == [("write", A, True, [1, 2, 3])]


def test_create_then_writes_fold_into_create_with_content():
    plan = coalesce(
        ops(create(A, "f"), ("write", A, {}), ("setattr", A, {"mode": 0o600}), ("write", A, {}))
    )
    assert summary(plan) == [("create", A, True, [1, 2, 3, 4])]
    assert plan.ops[0].args["mode"] == 0o600


def test_created_then_deleted_sends_nothing():
    plan = coalesce(
        ops(
            create(A, "f"),
            ("write", A, {}),
            ("rename", A, {"parent": ROOT, "name": "g", "replaced": None}),
            ("delete", A, {}),
        )
    )
    assert plan.ops == []
    assert sorted(plan.dropped) == [1, 2, 3, 4]


def test_created_dir_deleted_with_its_children_sends_nothing():
    plan = coalesce(
        ops(
            create(D, "d", kind="dir"),
            create(A, "f", parent=D),
            ("delete", A, {}),
            ("delete", D, {}),
        )
    )
    assert plan.ops == [] and sorted(plan.dropped) == [1, 2, 3, 4]


def test_created_dir_is_kept_while_a_child_moved_out_still_needs_it():
    plan = coalesce(
        ops(
            create(D, "d", kind="dir"),
            create(A, "f", parent=D),
            create(B, "x"),  # something else moved in between: renames cannot fold
            ("rename", A, {"parent": ROOT, "name": "f", "replaced": None}),
            ("delete", D, {}),
        )
    )
    kinds = [(p.kind, p.entry_id) for p in plan.ops]
    assert kinds == [("create", D), ("create", A), ("create", B), ("rename", A), ("delete", D)]


def test_write_then_delete_of_server_entry_only_deletes():
    plan = coalesce(ops(("write", A, {}), ("setattr", A, {"mode": 0o600}), ("delete", A, {})))
    assert summary(plan) == [("delete", A, False, [1, 2, 3])]


def test_rename_chain_folds_when_nothing_else_moved():
    plan = coalesce(
        ops(
            ("rename", A, {"parent": ROOT, "name": "b", "replaced": None}),
            ("write", C, {}),
            ("rename", A, {"parent": D, "name": "c", "replaced": None}),
        )
    )
    assert summary(plan) == [("rename", A, False, [1, 3]), ("write", C, True, [2])]
    assert plan.ops[0].args["parent"] == D and plan.ops[0].args["name"] == "c"


def test_rename_chain_keeps_order_when_a_name_changed_hands():
    # a -> b, then a new file takes the name a, then b -> c: folding would be wrong if
    # the second rename moved before the create (fine) -- but folding into the first
    # rename is only safe when nothing else moved; here something did.
    plan = coalesce(
        ops(
            ("rename", A, {"parent": ROOT, "name": "b", "replaced": None}),
            create(B, "a"),
            ("rename", A, {"parent": ROOT, "name": "c", "replaced": None}),
        )
    )
    assert [(p.kind, p.entry_id) for p in plan.ops] == [("rename", A), ("create", B), ("rename", A)]


def test_create_then_rename_folds_into_create():
    plan = coalesce(
        ops(
            create(A, "tmp"),
            ("write", A, {}),
            ("rename", A, {"parent": ROOT, "name": "final", "replaced": None}),
        )
    )
    assert summary(plan) == [("create", A, True, [1, 2, 3])]
    assert plan.ops[0].args["name"] == "final"


def test_rename_over_new_file_drops_the_replaced_file():
    plan = coalesce(
        ops(
            create(B, "target"),
            ("write", B, {}),
            create(A, "tmp"),
            ("rename", A, {"parent": ROOT, "name": "target", "replaced": B}),
        )
    )
    assert [(p.kind, p.entry_id, p.args["name"]) for p in plan.ops] == [("create", A, "target")]
    assert sorted(plan.dropped) == [1, 2]
    assert all_seqs(plan) == [1, 2, 3, 4]


def test_rename_over_server_file_keeps_replace():
    plan = coalesce(
        ops(("write", B, {}), ("rename", A, {"parent": ROOT, "name": "t", "replaced": B}))
    )
    assert summary(plan) == [("rename", A, False, [1, 2])]
    assert plan.ops[0].args["replaced"] == B


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown kind"):
        coalesce([JournalOp(7, "chown", A, {})])


def test_split_batches_never_names_an_entry_twice():
    plan = coalesce(
        ops(
            create(A, "a"),
            create(B, "b"),
            create(C, "x"),
            ("rename", A, {"parent": ROOT, "name": "z", "replaced": None}),
        )
    )
    batches = split_batches(plan.ops, max_ops=100)
    assert [[p.entry_id for p in b] for b in batches] == [[A, B, C], [A]]
    assert [len(b) for b in split_batches(plan.ops, max_ops=2)] == [2, 2]


def test_every_seq_is_accounted_for_in_a_long_mixed_history():
    rows = []
    for i in range(30):
        eid = f"{i:032x}"
        rows += [create(eid, f"f{i}"), ("write", eid, {}), ("write", eid, {})]
        if i % 3 == 0:
            rows.append(("delete", eid, {}))
        if i % 5 == 0:
            rows.append(("rename", eid, {"parent": ROOT, "name": f"g{i}", "replaced": None}))
    plan = coalesce(ops(*rows))
    assert all_seqs(plan) == list(range(1, len(rows) + 1))
    assert {p.kind for p in plan.ops} <= {"create", "rename"}
    assert len([p for p in plan.ops if p.kind == "create"]) == 20


@pytest.fixture
def db(tmp_path: Path) -> sqlite3.Connection:
    conn = open_db(tmp_path / "state.db")
    yield conn
    conn.close()


def test_journal_table_roundtrip(db: sqlite3.Connection):
    j = Journal(db)
    assert j.is_empty()
    s1 = j.append("create", A, parent=ROOT, name="f", kind="file", mode=0o644, mtime_ns=5)
    s2 = j.append("write", A)
    assert s2 > s1
    assert [(o.seq, o.kind, o.args.get("name")) for o in j.pending()] == [
        (s1, "create", "f"),
        (s2, "write", None),
    ]
    assert j.pending_for(A) and not j.pending_for(B)
    j.ack([s1])
    assert [o.seq for o in j.pending()] == [s2]
    j.ack([s2])
    assert j.is_empty()


def test_append_is_durable_across_connections(tmp_path: Path, db: sqlite3.Connection):
    Journal(db).append("delete", A)
    other = sqlite3.connect(tmp_path / "state.db")
    try:
        assert [o.kind for o in Journal(other).pending()] == ["delete"]
    finally:
        other.close()


def test_replaced_entry_counts_as_pending(db: sqlite3.Connection):
    j = Journal(db)
    j.append("rename", A, parent=ROOT, name="t", replaced=B)
    assert j.pending_for(B)


def test_inflight_batches_survive_a_restart(tmp_path: Path, db: sqlite3.Connection):
    j = Journal(db)
    j.begin_batch("k1", [3, 1, 2], {"ops": [{"op": "delete", "id": A, "base": 4}]})
    j.begin_batch("k2", [9], {"ops": []})
    j.end_batch("k2")
    other = open_db(tmp_path / "state.db")
    try:
        [batch] = Journal(other).inflight_batches()
    finally:
        other.close()
    assert (batch.key, batch.seqs, batch.request["ops"][0]["base"]) == ("k1", [1, 2, 3], 4)


def test_delete_and_replacing_rename_record_base_revisions(db: sqlite3.Connection):
    db.execute(
        "INSERT INTO mirror (id, parent, name, kind, mode, mtime_ns, ctime_ns, revision)"
        " VALUES (?, 1, 'x', 'file', 420, 0, 0, 17)",
        (B,),
    )
    j = Journal(db)
    j.append("rename", A, parent=ROOT, name="x", replaced=B)
    j.append("delete", B)
    rename, delete = j.pending()
    assert rename.args["replaced_base"] == 17 and delete.args["base"] == 17


def test_unknown_kind_is_not_appended(db: sqlite3.Connection):
    with pytest.raises(ValueError, match="chown"):
        Journal(db).append("chown", A)


async def test_wait_nonempty_wakes_on_append(db: sqlite3.Connection):
    j = Journal(db)
    woke = trio.Event()

    async def waiter() -> None:
        await j.wait_nonempty()
        woke.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(0.05)
        assert not woke.is_set()
        j.append("write", A)
        with trio.fail_after(2):
            await woke.wait()


def test_backup_save_pattern_folds_into_one_write_of_the_original():
    """rename to backup~, create new, delete it again (take-over), rename back, write: one write."""
    away = {
        "parent": ROOT,
        "name": "doc~",
        "replaced": None,
        "from_parent": ROOT,
        "from_name": "doc",
    }
    back = {"parent": ROOT, "name": "doc", "replaced": None}
    plan = coalesce(
        ops(
            ("rename", "X", away),
            create("Y", "doc"),
            ("write", "Y", {}),
            ("delete", "Y", {"base": 0}),
            ("rename", "X", back),
            ("write", "X", {}),
        )
    )
    assert summary(plan) == [("write", "X", True, [6])]
    assert all_seqs(plan) == [1, 2, 3, 4, 5, 6]


def test_a_rename_back_is_kept_when_another_entry_moved_in_between():
    away = {
        "parent": ROOT,
        "name": "doc~",
        "replaced": None,
        "from_parent": ROOT,
        "from_name": "doc",
    }
    back = {"parent": ROOT, "name": "doc", "replaced": None}
    plan = coalesce(ops(("rename", "X", away), create("Z", "other"), ("rename", "X", back)))
    assert [p.kind for p in plan.ops] == ["rename", "create", "rename"]
