"""The `ferry` command: a dispatcher from subcommand to the module that owns it.

Each subcommand parses its own arguments in its own module, so that the server
(`remote.server.cli`) and the drive (`vfs.commands`) stay independent and this
file only names them.
"""

from __future__ import annotations

import importlib
import sys

#: subcommand -> (module, function, one-line help). The function takes argv (list[str]) and
#: returns an exit status.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("remote.server.cli", "serve_main", "run the sync server in the foreground"),
    "admin": (
        "remote.server.cli",
        "admin_main",
        "manage users, libraries and shares; check a store",
    ),
    "up": ("vfs.commands", "up_main", "start a local server and mount a drive, zero config"),
    "down": ("vfs.up", "down_main", "unmount a drive started by `ferry up` and stop its server"),
    "mount": ("vfs.commands", "mount_main", "mount a library as a drive"),
    "unmount": ("vfs.commands", "unmount_main", "unmount a drive cleanly"),
    "sync": ("vfs.commands", "sync_main", "wait until every local change is on the server"),
    "status": ("vfs.commands", "status_main", "show what a mounted drive is doing"),
    "ls": ("vfs.steer_cli", "ls_main", "list files with their sync state"),
    "pin": ("vfs.steer_cli", "pin_main", "keep files or folders available offline"),
    "unpin": ("vfs.steer_cli", "unpin_main", "stop keeping files or folders offline"),
    "evict": ("vfs.steer_cli", "evict_main", "free local copies of files now"),
    "versions": ("vfs.steer_cli", "versions_main", "list a file's versions"),
    "restore": ("vfs.steer_cli", "restore_main", "bring back an old version of a file"),
    "trash": ("vfs.steer_cli", "trash_main", "list deleted files and folders"),
    "undelete": ("vfs.steer_cli", "undelete_main", "restore a deleted file or folder"),
}


def usage() -> str:
    lines = ["usage: ferry COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run `ferry COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"ferry: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[name]
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(rest) or 0)


def mount_helper_main() -> int:
    """Entry point for `mount.ferry`, so that /etc/fstab lines can mount a drive."""
    return int(importlib.import_module("vfs.commands").fstab_main(sys.argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
