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


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary sibling path of ``path`` that replaces ``path`` on success.

    Write the file at the yielded path; on any error it is removed and
    ``path`` keeps its old content (or stays absent). The file gets the
    permissions of the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: a temporary sibling, then a rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
