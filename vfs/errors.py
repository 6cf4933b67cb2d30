"""The only errno table of the drive: domain errors in, `pyfuse3.FUSEError` out.

Every FUSE handler runs under `fuse_errors`, so only `FUSEError` ever leaves a
handler (anything else would end `pyfuse3.main()`). Domain errors raised by the
mirror, the working copies and the reader carry no errno; this module chooses
it. An exception nobody expected is a bug: it is logged with the request it
broke and answered EIO, and the drive keeps running.
"""

from __future__ import annotations

import errno
import functools
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import pyfuse3

from remote.errors import Forbidden, RemoteError
from remote.protocol import ProtocolError
from vfs.mirror import EntryExists, NoSuchEntry

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class DriveError(Exception):
    """A request the drive refuses for a reason the user should hear about."""

    errno = errno.EIO


class NotADirectory(DriveError):
    errno = errno.ENOTDIR


class IsADirectory(DriveError):
    errno = errno.EISDIR


class DirectoryNotEmpty(DriveError):
    errno = errno.ENOTEMPTY


class ReadOnlyLibrary(DriveError):
    errno = errno.EROFS


class NotPermitted(DriveError):
    """Operations ferry does not do (hard links, device nodes, chown to another user)."""

    errno = errno.EPERM


class NotSupported(DriveError):
    errno = errno.EOPNOTSUPP


class InvalidArgument(DriveError):
    errno = errno.EINVAL


class ContentUnavailable(DriveError):
    """File content that is neither cached nor fetchable now (offline, server error)."""

    errno = errno.EIO


_ERRNO_BY_TYPE: list[tuple[type[BaseException], int]] = [
    (NoSuchEntry, errno.ENOENT),
    (EntryExists, errno.EEXIST),
    (Forbidden, errno.EACCES),
    (RemoteError, errno.EIO),
]


def errno_for(exc: BaseException) -> int | None:
    """The errno a known exception maps to, or None for a bug."""
    if isinstance(exc, DriveError):
        return exc.errno
    if isinstance(exc, ProtocolError):
        return errno.ENAMETOOLONG if exc.code == "name_too_long" else errno.EINVAL
    for kind, number in _ERRNO_BY_TYPE:
        if isinstance(exc, kind):
            return number
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno  # local I/O (working copies, cache disk): ENOSPC, EDQUOT, EFBIG, ...
    if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
        return errno.ENOSPC  # state.db could not grow: the cache disk is full
    return None


def fuse_errors(handler: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Wrap a FUSE handler so that it only ever raises FUSEError (see module docstring)."""

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            number = errno_for(exc)
            if number is None:
                log.exception(
                    "bug: %s%r failed unexpectedly; answered EIO", handler.__name__, args[1:]
                )
                number = errno.EIO
            elif number == errno.EIO:
                log.warning("%s%r failed: %s", handler.__name__, args[1:], exc)
            else:
                log.debug("%s%r: %s", handler.__name__, args[1:], exc)
            raise pyfuse3.FUSEError(number) from None

    return wrapper
