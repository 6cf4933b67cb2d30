"""Helpers of `tools/bench`, the side-by-side benchmark of ferry against `rclone mount`.

`proxy` counts bytes on the wire, `procs` starts and always stops processes and
mounts, `dataset` makes the test data, `systems` wraps ferry, rclone and a
native directory behind one interface, `workloads` holds the measured
operations, and `report` turns runs into the printed table.
"""
