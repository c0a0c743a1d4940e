"""Small shared helpers: seeding, atomic writes, hashing, progress bars, logging."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def atomic_path(target: str | Path, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it onto ``target``.

    Outputs are never left half-written: an exception removes the temporary path and leaves
    any previous ``target`` untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    # mkstemp/mkdtemp create private (0600/0700) paths; outputs get the usual permissions.
    os.chmod(tmp, (0o777 if is_dir else 0o666) & ~umask)
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


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
