"""Small shared helpers: seeding, atomic writes, hashing, progress bars, logging."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from glob import escape as glob_escape
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
    """Seed Python and NumPy (torch, which only segmentation uses, too:
    :func:`bonemet.segmentation.networks.seed_everything`)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))


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
    untouched and removes the temporary path (a kill leaves it, hidden: ``.<name>.<pid>.*``). A
    full disk or a read-only folder is an :class:`OutputWriteError` naming ``target``. A folder is
    swapped in with two renames (the old one aside first, then the new one in place), so a kill
    between them leaves the old one, renamed, rather than nothing; the temporary folders a killed
    process left for ``target`` (its pid is gone) are removed when the next one starts.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if is_dir:
            _remove_abandoned(target)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", dir=target.parent))
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
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.old.", dir=target.parent))
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


def _remove_abandoned(target: Path) -> None:
    """Remove the temporary folders ``.<name>.<pid>.[old.]XXXXXXXX`` that processes of this host,
    now gone, left for ``target`` (each killed preprocess stage would leave a whole cohort)."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.(?:old\.)?[a-z0-9_]{{8}}")
    for path in target.parent.glob(f"{glob_escape(f'.{target.name}.')}*"):
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink() and not pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def die_with_parent() -> None:
    """Worker-process initializer: the worker gets SIGKILL when the process that started it dies
    (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere nothing). A stage killed with SIGKILL then
    leaves no worker behind, idle forever or still writing (checkpoints, cache entries) next to
    its rerun's."""
    import sys

    if not sys.platform.startswith("linux"):  # pragma: no cover
        return
    import ctypes
    import multiprocessing
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the parent died before the call above
        os.kill(os.getpid(), signal.SIGKILL)


def end_with_parent() -> None:
    """For a process that DVC started (a stage): it gets SIGTERM when the process that started it
    dies (``dvc queue kill``, a killed ``dvc repro`` or ``dvc exp run``; Linux ``PR_SET_PDEATHSIG``),
    and on SIGTERM it kills every process it started (fold workers, extraction pools) before it
    exits with 143, its open runs and temporary outputs closed as on any error. Nothing of a killed
    experiment keeps training."""
    import signal
    import sys

    def terminate(signum: int, _frame: Any) -> None:
        kill_descendants()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)


def kill_descendants() -> None:
    """SIGKILL every process this one started, and theirs."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(children, timeout=5)


def resolve_jobs(n_jobs: int, n_tasks: int) -> int:
    """Worker processes for ``n_tasks`` tasks: ``n_jobs`` (-1: every core), at most one per task, at least 1."""
    cores = os.cpu_count() or 1
    return max(1, min(n_tasks, cores if n_jobs == -1 else n_jobs))


def finite_or(value: Any, fallback: Any) -> Any:
    """``value`` as a float when it is a finite number, else ``fallback`` (None included)."""
    return float(value) if value is not None and math.isfinite(float(value)) else fallback


def json_rounded(value: Any, digits: int = 6) -> Any:
    """``value`` with every float rounded to ``digits`` decimals and NaN / inf as None (JSON has no
    NaN), through dicts, lists and tuples: the same numbers give the same bytes on every rerun."""
    if isinstance(value, dict):
        return {k: json_rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_rounded(v, digits) for v in value]
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else None
    return value


def some(items: Iterable[Any], show: int = 5) -> str:
    """The first ``show`` items, comma-separated, and how many more (for messages naming cases or columns)."""
    items = [str(i) for i in items]
    return ", ".join(items[:show]) + (f" and {len(items) - show} more" if len(items) > show else "")


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


#: Progress bars on or off for the whole process (the command line turns them off for
#: ``BONEMET_PROGRESS=0``, as CI does); each call's ``disable`` comes on top.
_PROGRESS = {"enabled": True}


def configure_progress(enabled: bool) -> None:
    """Turn every progress bar of this process (and of the workers it forks) on or off."""
    _PROGRESS["enabled"] = bool(enabled)


def _bar_desc(desc: str) -> str:
    prefix = _LOG_CONTEXT.get("prefix")
    return f"{prefix} {desc}" if prefix else desc


def progress(
    iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "case", disable: bool = False
) -> Iterator[T]:
    """A tqdm bar on stderr with counts, rate and time left (the one progress helper)."""
    from tqdm.auto import tqdm

    return iter(
        tqdm(
            iterable,
            total=total,
            desc=_bar_desc(desc),
            unit=unit,
            dynamic_ncols=True,
            disable=disable or not _PROGRESS["enabled"],
            mininterval=1.0,
        )
    )


def progress_bar(total: int, desc: str, unit: str, disable: bool = False) -> Any:
    """A tqdm bar advanced by hand (``bar.update(1)``; a context manager) for callback-driven loops
    such as Optuna's trials; same look and switch as :func:`progress`."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=_bar_desc(desc), unit=unit, dynamic_ncols=True, mininterval=1.0,
                disable=disable or not _PROGRESS["enabled"])


# --- log context and captured warnings ---------------------------------------------------------

#: ``prefix``: put before every log line and bar of this process (a fold worker: "[fold 3]").
_LOG_CONTEXT: dict[str, Any] = {}


@contextlib.contextmanager
def log_context(prefix: str) -> Iterator[None]:
    """Prefix every log record made in this process (and every progress bar's label) with ``prefix``,
    e.g. ``[fold 3]`` in a fold worker, so interleaved lines of parallel workers say whose they are."""
    old_factory = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = old_factory(*args, **kwargs)
        record.msg = f"{prefix} {record.msg}"
        return record

    previous = _LOG_CONTEXT.get("prefix")
    _LOG_CONTEXT["prefix"] = prefix
    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        logging.setLogRecordFactory(old_factory)
        if previous is None:
            _LOG_CONTEXT.pop("prefix", None)
        else:
            _LOG_CONTEXT["prefix"] = previous


#: Terminal colour codes some libraries put into warnings (not for a log file).
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: The marker of a captured warning's first line in a stage log (what the summary counts).
WARNING_MARK = "[warning] "
_CAPTURE: dict[str, Any] = {}


def _write_entry(category: str, filename: str, lineno: int | str, text: str) -> None:
    """One captured warning into the active log file (one append: safe across forked workers)."""
    path = _CAPTURE.get("path")
    if path is None:
        return
    prefix = _LOG_CONTEXT.get("prefix")
    body = _ANSI.sub("", text).strip().replace("\n", "\n    ")
    entry = f"{WARNING_MARK}{category} at {_short_path(filename)}:{lineno}{' ' + prefix if prefix else ''}\n    {body}\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(entry)


#: ``warnings.formatwarning``'s text, which ``logging.captureWarnings`` sends to the ``py.warnings`` logger.
_FORMATTED = re.compile(r"(?s)^(?P<file>.*?):(?P<line>\d+): (?P<category>\w+): (?P<message>.*)$")


def _warning_entry(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                   file: Any = None, line: str | None = None) -> None:
    """``warnings.showwarning`` while warnings are captured: the warning becomes an entry of the log."""
    _write_entry(category.__name__, filename, lineno, str(message))


class _WarningEntries(logging.Handler):
    """Handler of the ``py.warnings`` logger: each warning routed through logging becomes an entry
    of the stage's log. Some libraries (Great Expectations) turn that routing on
    (``logging.captureWarnings``) when imported, which replaces :func:`_warning_entry` as
    ``warnings.showwarning``; their warnings still land in the log this way.
    """

    def emit(self, record: logging.LogRecord) -> None:
        text = str(record.args[0]) if isinstance(record.args, tuple) and record.args else record.getMessage()
        found = _FORMATTED.match(text)
        if found:
            _write_entry(found["category"], found["file"], found["line"], found["message"])
        else:
            _write_entry("Warning", "unknown", 0, text)


def _short_path(filename: str) -> str:
    """``site-packages/sklearn/x.py`` -> ``sklearn/x.py``; our own files relative to the package."""
    parts = Path(filename).parts
    for anchor in ("site-packages", "dist-packages", "src"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + 1:])
    return Path(filename).name


def active_warnings_log() -> Path | None:
    """The log file warnings are captured into in this process, or None."""
    return _CAPTURE.get("path")


def warning_counts(path: str | Path) -> dict[str, int]:
    """``{"Category at file:line": count}`` from a stage log (every process's warnings)."""
    return {kind: count for kind, (count, _) in _warning_kinds(path).items()}


def _warning_kinds(path: str | Path) -> dict[str, tuple[int, str]]:
    """``{kind: (count, first message's first line)}`` from a stage log."""
    kinds: dict[str, tuple[int, str]] = {}
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, text in enumerate(lines):
        if text.startswith(WARNING_MARK):
            key = text[len(WARNING_MARK):].split(" [", 1)[0]
            first = lines[i + 1].strip() if i + 1 < len(lines) else ""
            count, message = kinds.get(key, (0, first))
            kinds[key] = (count + 1, message)
    return kinds


@contextlib.contextmanager
def capture_warnings(path: str | Path | None, stage: str) -> Iterator[None]:
    """Send every Python warning of this stage (and of the worker processes it forks, or that call
    :func:`worker_warnings`) to ``path`` in full, none to the screen; at the end log one line per
    kind (category and place) with its count. ``path`` None: counted in memory only, no file.

    A warning a user cannot act on (a library's deprecation notice, a convergence note inside
    tuning) then costs one summary line instead of pages of repeats.
    """
    import tempfile

    own = path is None
    if own:
        fd, name = tempfile.mkstemp(prefix=f"bonemet-{stage}-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    else:
        log_path = Path(path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("", encoding="utf-8")
    handler = None
    if not own:  # the stage's log lines go to the file too
        handler = logging.FileHandler(log_path, mode="a", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logging.getLogger().addHandler(handler)
    try:
        with worker_warnings(log_path):
            yield
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        where = f" (full text: {log_path})" if not own else ""
        for kind, (count, message) in sorted(_warning_kinds(log_path).items(), key=lambda kv: (-kv[1][0], kv[0])):
            short = message if len(message) <= 90 else message[:87] + "..."
            log.warning("%s: %d x %s: %s%s", stage, count, kind, short, where)
        if own:
            log_path.unlink(missing_ok=True)


@contextlib.contextmanager
def worker_warnings(path: str | Path | None) -> Iterator[None]:
    """Every warning of this process into the log ``path``, none to the screen: what
    :func:`capture_warnings` does for a stage, and what a worker process that was not forked from
    it (a spawned loky worker) calls with the stage's :func:`active_warnings_log`."""
    import warnings

    if path is None:
        yield
        return
    previous = _CAPTURE.get("path")
    _CAPTURE["path"] = Path(path)
    logger = logging.getLogger("py.warnings")
    handler, propagate = _WarningEntries(), logger.propagate
    with warnings.catch_warnings():  # puts the filters and warnings.showwarning back
        warnings.simplefilter("always")  # every occurrence counted, not the first per place
        # our own showwarning, not logging.captureWarnings(True): that is a no-op once anything (a
        # library at import, a test harness) has called it, leaving the warnings on the screen
        warnings.showwarning = _warning_entry
        logger.addHandler(handler)
        logger.propagate = False
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.propagate = propagate
            _CAPTURE["path"] = previous
