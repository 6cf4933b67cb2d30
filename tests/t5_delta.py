"""Delta sync through real mounts: bytes on the wire for small edits of a large file (issue 6).

Runs `tools/bench_delta.py`'s cases (each device behind its own counting
proxy, so every HTTP byte both ways is counted) on a 24 MiB file of random
bytes and asserts the issue's bounds: edits (a) to (c) and their download on
another device (d) within two mean chunks plus 64 KiB each way, the edit of
a mostly uncached file (e) within three chunks. A change that makes ferry
upload or download whole files again fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tools import bench_delta

pytestmark = pytest.mark.mount

SIZE = 24 * bench_delta.MIB


def test_small_edits_move_only_the_chunks_they_touch(tmp_path: Path) -> None:
    wire = bench_delta.run_ferry(tmp_path, SIZE)
    limits = bench_delta.bounds(SIZE)
    report = bench_delta.report(SIZE, wire, None)
    for case, limit in limits.items():
        assert wire[case].up <= limit.up, f"case {case} sent too much:\n{report}"
        assert wire[case].down <= limit.down, f"case {case} received too much:\n{report}"
    # The edits upload data (the chunk they touch), the other device downloads it.
    for case in ("a", "b", "c"):
        assert wire[case].up > 64 * 1024
        assert wire[f"d{case}"].down > 64 * 1024
    # Device E fetched the one chunk its edit touched, not the file.
    assert 64 * 1024 < wire["e"].down < SIZE // 4
