"""Writing a whole file the way users expect of an export: all or nothing, and where they said.

A temporary file renamed over the path means a reader sees the old contents or the new ones,
never half; but a rename replaces whatever the path *is*. A symlink would become a regular file
(the file it pointed to keeping its old contents), and a FIFO or a device (``/dev/stdout``) would
be replaced by a file instead of written to. So the rename happens at the symlink's target, and a
path that is not a regular file is written to directly.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` whole (see the module's docstring); errors name ``path``."""
    shown = os.fspath(path)
    target = os.path.realpath(shown)
    try:
        info: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        info = None
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), shown)
    if info is not None and not stat.S_ISREG(info.st_mode):  # a FIFO, a device: nothing to replace
        with open(target, "w", encoding="utf-8") as f:
            f.write(text)
        return
    tmp = f"{target}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    except OSError as exc:
        raise type(exc)(exc.errno, exc.strerror, shown) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if info is not None:
                os.fchmod(f.fileno(), stat.S_IMODE(info.st_mode))  # replacing a file keeps its mode
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):  # no half-written file left behind
            os.remove(tmp)
        raise
