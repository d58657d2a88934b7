"""Write-once cache folders that concurrent processes can race for safely.

A writer builds the entry beside its final name (a temp name holding its pid, unique per call) and
publishes it with one ``rename``; readers only ever see a complete entry or none. A writer that
loses the race (the entry appeared meanwhile) discards its copy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def publish_dir(target: Path, write: Callable[[Path], None], complete: Callable[[Path], bool]) -> bool:
    """Create the directory ``target`` by ``write(tmp)`` into a sibling temp directory, then rename it.

    ``complete(target)`` says whether an existing ``target`` is a finished entry. Returns True when
    this call published ``target``, False when a finished one was already there or another writer
    published it first (this call's copy is deleted then). An unfinished ``target`` that blocks the
    rename is an ``OSError`` naming it (delete it and retry). The temp directory never outlives
    the call, also when ``write`` raises.
    """
    target = Path(target)
    if complete(target):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp{os.getpid()}-", dir=target.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, target)  # atomic; fails when target is a non-empty directory
        except OSError as err:
            if complete(target):
                return False  # a concurrent writer finished first
            raise OSError(f"cannot publish {target}: {err}; if it is a leftover, delete it and retry") from None
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

