"""Every shell block of the README works as written, run verbatim as a new user would.

The blocks run in one bash session, in order, in a throwaway copy of the repository (git and DVC
initialised there, its own venv link) with a clean ``PATH`` (no venv on it). The only thing the
test changes is the cohort: params.yaml gets the tiny synthetic cohort of the smoke run
(ci/smoke_params.yaml: 24 small cases, few epochs and trials) so the quick start takes minutes,
not half an hour. A block that only illustrates (it needs a GPU, a second cohort, or it is the
test command itself) is marked in the README with ``<!-- readme-test: skip: why -->`` on the line
before it; the set is checked to stay small, and every mark must give its reason.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?:<!--\s*readme-test:\s*(?P<mark>[^>]*?)\s*-->[ \t]*\n)?```bash\n(?P<body>.*?)```", re.S)
#: At most this many README blocks may be illustrative only.
MAX_SKIPPED = 8


def readme_blocks(text: str) -> list[tuple[str | None, str]]:
    """``(mark, body)`` for every ```bash block of the README, in order (mark: the skip reason or None)."""
    out = []
    for found in BLOCK.finditer(text):
        mark = found.group("mark")
        if mark is not None:
            assert mark.startswith("skip:") and len(mark.removeprefix("skip:").strip()) > 10, (
                f"a readme-test mark must read 'skip: <why>', found {mark!r}")
            mark = mark.removeprefix("skip:").strip()
        out.append((mark, found.group("body")))
    return out


def test_readme_blocks_are_found_and_few_are_illustrative():
    blocks = readme_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    skipped = [body.splitlines()[0] for mark, body in blocks if mark]
    assert len(blocks) >= 6 and len(skipped) <= MAX_SKIPPED, skipped
    run = "\n".join(body for mark, body in blocks if not mark)
    for needed in ("make run", "make exp", "bonemet models", "bonemet promote", "bonemet serve", "curl",
                   "bonemet predict", "bonemet validate"):
        assert needed in run, f"the README test would not run `{needed}`"


def _copy_repository(dest: Path) -> None:
    """The tracked and untracked (not ignored) files of this checkout, mtimes kept (so make sees
    the venv as up to date), and a link to its venv."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    archive = dest.parent / "repo.tar"
    with tarfile.open(archive, "w") as tar:
        for name in files:
            if (REPO / name).exists():
                tar.add(REPO / name, arcname=name, recursive=False)
    dest.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="tar")
    archive.unlink()
    (dest / ".venv").symlink_to(REPO / ".venv")


@pytest.mark.slow
def test_readme_shell_blocks_run_verbatim_on_a_tiny_cohort(tmp_path):
    from bonemet.config import deep_merge

    stamp = REPO / ".venv" / ".installed"
    stale = [f for f in ("pyproject.toml", "requirements.lock")
             if not stamp.is_file() or (REPO / f).stat().st_mtime > stamp.stat().st_mtime]
    if stale:  # `make run` in the copy would reinstall into the shared venv, pointing it at the copy
        pytest.fail(f".venv is older than {', '.join(stale)}: run `make venv` first")
    clone = tmp_path / "clone"
    _copy_repository(clone)
    params = deep_merge(yaml.safe_load((clone / "params.yaml").read_text()),
                        yaml.safe_load((REPO / "ci" / "smoke_params.yaml").read_text()))
    params["data"].update({"cohort_dir": "data/raw", "mask_label": 1})  # the default place, the default label
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bin_dir = REPO / ".venv" / "bin"
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path)),
           "LANG": "C.UTF-8", "PYTHONUTF8": "1", "BONEMET_PROGRESS": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1", "TMPDIR": str(tmp_path)}
    setup = f"""
set -euo pipefail
git init -q . && git config user.email readme@bonemet && git config user.name readme
test -d .dvc || {bin_dir}/dvc init -q
{bin_dir}/dvc config --local core.analytics false
# the tiny cohort at data/raw, versioned by data.dvc as a fresh clone's would be
{bin_dir}/bonemet synth data/raw --small --n 24 --n-positive 10 --no-progress
{bin_dir}/dvc commit -q -f data.dvc
git add -A >/dev/null && git commit -qm "readme test clone"
"""
    proc = subprocess.run(["bash", "-c", setup], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    blocks = readme_blocks((clone / "README.md").read_text(encoding="utf-8"))
    script = ["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
    for k, (mark, body) in enumerate(blocks):
        if mark:
            continue
        script.append("echo " + shlex.quote(f"== README block {k}: {body.splitlines()[0][:70]}"))
        script.append(body)
    (tmp_path / "readme.sh").write_text("\n".join(script) + "\n")
    # its own process group: a server a block starts (and what that server spawns, which may outlive
    # its parent and hold its output open) is stopped with it; output to files, not pipes, for that reason
    out_path, err_path = tmp_path / "readme.out", tmp_path / "readme.err"
    with open(out_path, "w") as out_file, open(err_path, "w") as err_file:
        proc = subprocess.Popen(["bash", str(tmp_path / "readme.sh")], cwd=clone, env=env, stdout=out_file,
                                stderr=err_file, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=1500)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            proc.wait(timeout=60)
    stdout, stderr = out_path.read_text(), err_path.read_text()
    out = stdout + stderr
    (tmp_path / "readme.log").write_text(out)
    assert proc.returncode == 0, f"a README command failed (log: {tmp_path / 'readme.log'}):\n{out[-6000:]}"
    assert (clone / "reports" / "index.html").is_file()
    assert '"probability' in stdout, "the curl call got no prediction back"
