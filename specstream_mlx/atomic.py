"""Atomic output folders: written under a temporary name, renamed when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """A temporary sibling folder of ``out`` that replaces ``out`` on success.

    The caller decides beforehand whether replacing an existing ``out`` is
    allowed. On any error the temporary folder is removed and ``out`` is left
    as it was; an interrupted run leaves either the old or the new folder.
    The folder gets the permissions of the umask (``mkdtemp`` makes it private).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old.{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
