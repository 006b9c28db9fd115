"""Folders built under a temporary name and moved into place whole: `.<final name>.tmp-<host>-<pid>` beside the
final folder, so that a reader never sees half of one. A build that is killed leaves its temporary folder behind
(the token cache's is as large as the corpus's tokens); the next build on that host removes those whose process is
gone. One on another host (a shared filesystem) is left alone: whether its process lives cannot be told from here.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path


def staging_folder(final: Path) -> Path:
    """This process's temporary folder for `final`, after removing any a killed build left (`remove_stale`)."""
    remove_stale(final)
    return final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def remove_stale(final: Path) -> list[Path]:
    """Remove the temporary folders of `final` left by dead processes of this host; returns those removed."""
    removed = []
    prefix = f".{final.name}.tmp-{socket.gethostname()}-"
    for path in final.parent.glob(f".{final.name}.tmp-*"):
        pid = path.name[len(prefix):] if path.name.startswith(prefix) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
