"""Small shared helpers: seeding, atomic writes, hashing, progress bars, logging."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from bonemet.errors import UserError

T = TypeVar("T")
log = logging.getLogger("bonemet")


def setup_logging(level: str | int = "INFO") -> None:
    """Configure the root logger once for the command line."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Third-party chatter we never want at INFO.
    for noisy in ("radiomics", "matplotlib", "alembic", "urllib3", "PIL", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and (when imported) torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    torch.manual_seed(seed)


#: errno values that mean "this output cannot be written here" (a user's disk or folder, not a bug).
UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


class OutputWriteError(UserError, OSError):
    """An output cannot be written: the disk is full, the folder read-only or not ours to write."""


def unwritable(target: Path, exc: OSError) -> OutputWriteError:
    """The error for ``exc`` (an OSError in :data:`UNWRITABLE`) while writing ``target``."""
    why = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
           errno.EROFS: "the file system is read-only", errno.EFBIG: "the file would be too large",
           errno.EIO: "the file did not land complete on the disk"}.get(exc.errno, "permission denied")
    error = OutputWriteError(exc.errno, f"cannot write {target}: {why}; free space or point the output elsewhere "
                                        "(its params key), then rerun. Outputs already written are unchanged")
    error.filename = str(target)
    return error


@contextlib.contextmanager
def atomic_path(target: str | Path, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it onto ``target``.

    Outputs are never left half-written: an exception (or a kill) leaves any previous ``target``
    untouched and removes the temporary path (a kill leaves it, hidden: ``.<name>.*``). A full
    disk or a read-only folder is an :class:`OutputWriteError` naming ``target``. A folder is
    swapped in with two renames (the old one aside first, then the new one in place), so a kill
    between them leaves the old one, renamed, rather than nothing.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as exc:
        if exc.errno in UNWRITABLE:
            raise unwritable(target, exc) from exc
        raise
    umask = os.umask(0)
    os.umask(umask)
    # mkstemp/mkdtemp create private (0600/0700) paths; outputs get the usual permissions.
    os.chmod(tmp, (0o777 if is_dir else 0o666) & ~umask)
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, aside / target.name)
            os.replace(tmp, target)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            if target.is_symlink():
                target.unlink()
            os.replace(tmp, target)
    except BaseException as exc:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, OutputWriteError) and exc.errno in UNWRITABLE:
            raise unwritable(target, exc) from exc
        raise


def resolve_jobs(n_jobs: int, n_tasks: int) -> int:
    """Worker processes for ``n_tasks`` tasks: ``n_jobs`` (-1: every core), at most one per task, at least 1."""
    cores = os.cpu_count() or 1
    return max(1, min(n_tasks, cores if n_jobs == -1 else n_jobs))


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically, sorted keys, 2-space indent, NaN refused."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False, default=_json_default) + "\n", encoding="utf-8")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def file_md5(path: str | Path, chunk: int = 1 << 20) -> str:
    """MD5 of a file's bytes, or of a folder's files (relative names and bytes, in sorted order:
    a DICOM series); used for cache keys, not security."""
    path = Path(path)
    h = hashlib.md5()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            h.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def progress(
    iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "case", disable: bool = False
) -> Iterator[T]:
    """A tqdm bar on stderr with counts, rate and time left."""
    from tqdm.auto import tqdm

    return iter(
        tqdm(
            iterable,
            total=total,
            desc=desc,
            unit=unit,
            dynamic_ncols=True,
            disable=disable,
            mininterval=1.0,
        )
    )
