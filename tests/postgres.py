"""A throwaway PostgreSQL server for the team tests: Debian's binaries, loopback only, a temp folder.

``.ci/run`` installs Debian's ``postgresql`` package when it is missing (as root). PostgreSQL
refuses to run as root, so when the tests do, ``initdb`` and ``pg_ctl`` run as the package's
``postgres`` user (``runuser -u postgres``) in a folder that user owns. Without the binaries the
tests that need a server skip and say why (:func:`skip_reason`).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: the database user the tests connect as (trust authentication on 127.0.0.1 only)
USER = "bonemet"


def _bin_dir() -> Path | None:
    """Debian's PostgreSQL server binaries (``/usr/lib/postgresql/<version>/bin``, newest first), or
    whatever ``initdb`` is on PATH."""
    for version in sorted(Path("/usr/lib/postgresql").glob("*"), key=lambda p: -int(p.name) if p.name.isdigit() else 0):
        if (version / "bin" / "initdb").is_file() and (version / "bin" / "pg_ctl").is_file():
            return version / "bin"
    found = shutil.which("initdb")
    return Path(found).parent if found and (Path(found).parent / "pg_ctl").is_file() else None


def _run_as() -> list[str]:
    """The command prefix that runs a server binary as a non-root user (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "postgres", "--"]


def skip_reason() -> str | None:
    """Why a PostgreSQL server cannot be started here, or None when it can."""
    if _bin_dir() is None:
        return ("PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's postgresql package "
                "(`apt-get install -y postgresql`; .ci/run does it as root)")
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root without runuser: PostgreSQL cannot be started as root"
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and no 'postgres' user to run PostgreSQL as (Debian's package creates it)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def postgres_server(databases: tuple[str, ...]) -> Iterator[dict[str, str]]:
    """Start PostgreSQL on 127.0.0.1 with ``databases`` created; yields ``{name: SQLAlchemy URL}``.

    The cluster lives in a new temporary folder (removed afterwards), with fsync off (a test's
    data need not survive a crash) and trust authentication for 127.0.0.1 only.
    """
    bin_dir, prefix = _bin_dir(), _run_as()
    assert bin_dir is not None, skip_reason()
    root = Path(tempfile.mkdtemp(prefix="bonemet-pg-"))
    data, log = root / "data", root / "server.log"
    if prefix:  # the server's user must own its folder
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
    port = _free_port()

    def run(*args: str) -> None:
        proc = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            detail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stdout[-1000:]}"
                               f"{proc.stderr[-2000:]}{detail}")

    run(str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync",
        "--no-instructions")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c full_page_writes=off"
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "-t", "60", "start")
    try:
        for name in databases:
            run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, name)
        yield {name: f"postgresql://{USER}@127.0.0.1:{port}/{name}" for name in databases}
    finally:
        subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
