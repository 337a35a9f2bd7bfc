"""Files the node creates are readable by the node's user only.

The data folder holds the catalogue (patient IDs, destination passwords and tokens), the
broker's messages, the spool, results, quarantine and the API token. The node sets its own
umask to 077 at start, whatever the umask it was started with, so everything it creates is
0600 (files) or 0700 (folders); folders and files that an earlier version or another tool
left open are closed at start. :func:`exposed` names what others can still read, for
``curia-node config check``.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

PRIVATE_UMASK = 0o077
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600


def restrict(data_path: Path, folders: tuple[Path, ...] = ()) -> None:
    """Set the process umask to 077 and close the data folder, ``folders`` and the files
    directly inside the data folder to the node's user."""
    os.umask(PRIVATE_UMASK)
    for folder in (data_path, *folders):
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if stat.S_IMODE(folder.stat().st_mode) & 0o077:
                folder.chmod(PRIVATE_DIR)
    with contextlib.suppress(FileNotFoundError, PermissionError):
        for entry in data_path.iterdir():
            if entry.is_file() and stat.S_IMODE(entry.stat().st_mode) & 0o077:
                entry.chmod(PRIVATE_FILE)


def exposed(data_path: Path, depth: int = 2) -> list[str]:
    """What in the data folder (``depth`` levels down) others may read, enter or write."""
    found: list[str] = []

    def visit(path: Path, level: int) -> None:
        try:
            mode = stat.S_IMODE(path.lstat().st_mode)
        except OSError:
            return
        if mode & 0o077:
            kind = "folder" if path.is_dir() else "file"
            found.append(f"{kind} {path} is {mode:04o}: other users can read it")
        if path.is_dir() and not path.is_symlink() and level < depth:
            with contextlib.suppress(OSError):
                for entry in sorted(path.iterdir()):
                    visit(entry, level + 1)

    visit(data_path, 0)
    return found
