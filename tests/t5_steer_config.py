"""A drive mounted from the configuration file alone, through the `mount.ferry` fstab helper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Library
from tests.support import ferry

pytestmark = pytest.mark.mount


def test_fstab_line_mounts_the_configured_drive(library: Library, tmp_path: Path) -> None:
    mountpoint, cache_dir = tmp_path / "Drive", tmp_path / "cache"
    mountpoint.mkdir()
    (tmp_path / "token").write_text(library.token)
    config = tmp_path / "conf" / "ferry" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(
        f'writeback_delay = 0.2\ntoken_file = "{tmp_path / "token"}"\n\n'
        f'[drive.docs]\nurl = "{library.url}"\nmountpoint = "{mountpoint}"\n'
        f'cache_dir = "{cache_dir}"\ncache_size = "64 MiB"\nxattrs = true\n'
    )
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "conf")}
    # What mount(8) runs for the fstab line `ferry  <mountpoint>  ferry  noauto,drive=docs  0 0`.
    helper = "from vfs.cli import mount_helper_main; mount_helper_main()"
    try:
        done = subprocess.run(
            [sys.executable, "-c", helper, "ferry", str(mountpoint), "-o", "rw,noauto,drive=docs"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        assert os.readlink(mountpoint / ".ferry" / "control") == str(cache_dir / "control.sock")
        info = json.loads(ferry("status", str(mountpoint), "--json").stdout)
        assert info["cache"]["capacity"] == 64 * 1024 * 1024
        (mountpoint / "hello.txt").write_text("from fstab")
        ferry("sync", str(mountpoint))
        assert os.getxattr(mountpoint / "hello.txt", "user.ferry.state") == b"cached"
        ferry("unmount", str(mountpoint))
        assert not os.path.ismount(mountpoint)
        refused = subprocess.run(
            [sys.executable, "-c", helper, "ferry", str(mountpoint), "-o", "drive=nope"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert refused.returncode == 2 and "no [drive.nope] table (drives: docs)" in refused.stderr
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
