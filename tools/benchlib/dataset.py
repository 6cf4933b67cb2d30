"""The benchmark's data, made once per run in the work directory and shared by every system.

A random big file (cold/warm reads, fio), a 100 MiB random file (the 1-byte
change), a tarball of this machine's Python standard library (untar, `ls -lR`,
`cp -r`) and its extracted tree, and the shape of a many-entry library for the
memory row. Random data is seeded, so runs are repeatable and incompressible.
"""

from __future__ import annotations

import os
import random
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path

MiB = 1024 * 1024
GiB = 1024 * MiB

#: Directories of the stdlib left out of the tree: installed packages are not the stdlib, and
#: test/ alone is half the files; without both the tree is the issue's "~4,000 files".
_EXCLUDED_TOP = frozenset({"site-packages", "dist-packages", "test"})


@dataclass(frozen=True)
class Dataset:
    """Paths and sizes of the prepared data (all native, under `root`)."""

    root: Path
    big: Path
    mid: Path
    tarball: Path
    tree: Path
    tree_files: int
    tree_bytes: int
    many_dirs: int
    many_per_dir: int

    @property
    def tree_name(self) -> str:
        return self.tree.name

    @property
    def many_entries(self) -> int:
        return self.many_dirs * (self.many_per_dir + 1)


def stdlib_dir() -> Path:
    """This machine's Python standard library (the pyenv 3.11.7 one the issue names, if present)."""
    preferred = Path("/root/.pyenv/versions/3.11.7/lib/python3.11")
    return preferred if preferred.is_dir() else Path(sysconfig.get_paths()["stdlib"])


def write_random(path: Path, size: int, seed: int) -> None:
    """Write `size` seeded random bytes to `path`, unless it already has that size."""
    if path.exists() and path.stat().st_size == size:
        return
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(rng.randbytes(n))
            left -= n
    tmp.rename(path)


def stdlib_files(source: Path, every: int) -> list[Path]:
    """Regular files and symlinks of the stdlib (minus the excluded tops), every `every`-th one."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(source):
        if Path(dirpath) == source:
            dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_TOP]
        dirnames.sort()
        for name in sorted(filenames):
            out.append(Path(dirpath, name))
    return out[::every]


def make_tarball(source: Path, tarball: Path, top: str, every: int) -> None:
    """Tar the chosen stdlib files under the directory name `top` (uncompressed, like a download)."""
    if tarball.exists():
        return
    tmp = tarball.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in stdlib_files(source, every):
            tar.add(path, arcname=f"{top}/{path.relative_to(source)}", recursive=False)
    tmp.rename(tarball)


def extract(tarball: Path, dest: Path) -> None:
    if dest.exists():
        return
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.mkdir(parents=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp, filter="tar")
    tmp.rename(dest)


def tree_totals(tree: Path) -> tuple[int, int]:
    """(number of regular files, their total size) under `tree`."""
    files = total = 0
    for dirpath, _, filenames in os.walk(tree):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if not os.path.islink(os.path.join(dirpath, name)):
                files += 1
                total += st.st_size
    return files, total


def prepare(root: Path, *, big_size: int, mid_size: int, tree_every: int, many: int) -> Dataset:
    """Make (or reuse) every input of the benchmark under `root/data`."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    big = data / "big.bin"
    mid = data / "mid.bin"
    write_random(big, big_size, seed=1)
    write_random(mid, mid_size, seed=2)
    tarball = data / f"stdlib-every{tree_every}.tar"
    top = "stdlib"
    make_tarball(stdlib_dir(), tarball, top, tree_every)
    extracted = data / f"extracted-every{tree_every}"
    extract(tarball, extracted)
    tree = extracted / top
    files, total = tree_totals(tree)
    per_dir = 1000
    return Dataset(
        root=data,
        big=big,
        mid=mid,
        tarball=tarball,
        tree=tree,
        tree_files=files,
        tree_bytes=total,
        many_dirs=max(1, many // per_dir),
        many_per_dir=per_dir,
    )
