"""Unit tests for vfs/sync/conflicts.py: conflict copy names."""

from __future__ import annotations

from datetime import datetime

from remote.protocol import MAX_NAME_BYTES, validate_name
from vfs.sync.conflicts import conflict_name, split_extension, unique_conflict_name

WHEN = datetime(2024, 3, 9, 7, 5)


def test_extension_stays_last():
    assert (
        conflict_name("report.txt", "laptop", WHEN)
        == "report (conflict from laptop 2024-03-09 0705).txt"
    )


def test_dotfiles_directories_and_bare_names_have_no_extension():
    assert split_extension(".bashrc") == (".bashrc", "")
    assert split_extension("notes.d", kind="dir") == ("notes.d", "")
    assert conflict_name("Makefile", "h", WHEN) == "Makefile (conflict from h 2024-03-09 0705)"


def test_long_names_are_shortened_to_a_valid_name():
    name = "é" * 120 + ".tar"
    out = conflict_name(name, "host", WHEN)
    assert len(out.encode()) <= MAX_NAME_BYTES
    assert out.endswith(" (conflict from host 2024-03-09 0705).tar")
    validate_name(out)


def test_unique_name_counts_up_past_taken_names():
    taken = {"a (conflict from h 2024-03-09 0705).txt", "a (conflict from h 2024-03-09 0705 2).txt"}
    assert unique_conflict_name("a.txt", "h", WHEN, taken.__contains__) == (
        "a (conflict from h 2024-03-09 0705 3).txt"
    )
