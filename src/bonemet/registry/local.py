"""The project's local MLflow store read without importing MLflow: aliases and model folders.

``bonemet predict`` with a given mask must answer in about two seconds, and ``import mlflow``
alone takes 1.7 s on 2 cores. For the local store (``sqlite:///<store_dir>/mlflow.db`` with
artifacts on disk) the two things prediction needs are plain reads:

* ``name@alias`` -> version: a row of MLflow's ``registered_model_aliases`` table;
* that version's model folder: the ``storage_location`` of its ``model_versions`` row (a
  ``file://`` URI; MLflow 3 stores the logged model's artifacts there), holding ``MLmodel``.

The database is opened read-only. Anything else (another tracking URI, a store whose schema
lacks these tables or columns, artifacts that are not local files) returns None, and the caller
goes through MLflow itself (:mod:`bonemet.registry.loaders`). A test checks these reads against
``MlflowClient`` on a real store.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)

SQLITE_PREFIX = "sqlite:///"


def default_tracking_uri(store_dir: str | Path) -> str:
    """SQLite backend inside ``store_dir`` (absolute, so it works from any working directory)."""
    return f"{SQLITE_PREFIX}{(Path(store_dir) / 'mlflow.db').resolve()}"


@dataclass(frozen=True)
class LocalModelVersion:
    """One registered model version of a local store.

    Attributes:
        name, version: registered name and version.
        model_dir: the folder holding its ``MLmodel`` file and artifacts.
        run_id: the run that logged it (may be empty).
    """

    name: str
    version: str
    model_dir: Path
    run_id: str


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _local_path(location: str | None) -> Path | None:
    if not location:
        return None
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and location.startswith("/"):
        return Path(location)
    return None


def resolve_alias(tracking_uri: str, name: str, alias: str) -> LocalModelVersion | None | bool:
    """``name@alias`` in a local SQLite store without MLflow.

    Returns:
        the version (with its local model folder); ``False`` when the store answers that no
        such alias exists; ``None`` when this store cannot be read this way (then use MLflow).
    """
    if not tracking_uri.startswith(SQLITE_PREFIX):
        return None
    db_path = Path(tracking_uri.removeprefix(SQLITE_PREFIX))
    if not db_path.is_file():
        return None
    try:
        db = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        if not ({"name", "alias", "version"} <= _columns(db, "registered_model_aliases")
                and {"name", "version", "storage_location", "run_id", "status"} <= _columns(db, "model_versions")):
            return None
        row = db.execute("SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?",
                         (name, alias)).fetchone()
        if row is None:
            return False
        version = str(row[0])
        found = db.execute("SELECT storage_location, run_id, status FROM model_versions WHERE name = ? AND version = ?",
                           (name, version)).fetchone()
    except sqlite3.Error as exc:
        log.debug("local store %s not readable directly (%s): using MLflow", db_path, exc)
        return None
    finally:
        db.close()
    if found is None or found[2] != "READY":
        return None
    model_dir = _local_path(found[0])
    if model_dir is None or not (model_dir / "MLmodel").is_file():
        return None
    return LocalModelVersion(name, version, model_dir, str(found[1] or ""))


def read_mlmodel(model_dir: str | Path) -> dict[str, Any]:
    """The ``MLmodel`` file of a model folder as a mapping (YAML, with the C loader when present)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(Path(model_dir) / "MLmodel", encoding="utf-8") as fh:
        return yaml.load(fh, Loader=loader)  # noqa: S506 (a safe loader)


def pyfunc_artifacts(model_dir: str | Path, mlmodel: dict[str, Any]) -> dict[str, Path] | None:
    """The artifacts of a python_function model (``{key: local path}``), or None when it has none."""
    flavor = (mlmodel.get("flavors") or {}).get("python_function") or {}
    artifacts = flavor.get("artifacts")
    if not isinstance(artifacts, dict) or not artifacts:
        return None
    out = {}
    for key, entry in artifacts.items():
        path = Path(model_dir) / str((entry or {}).get("path", ""))
        if not path.is_file():
            return None
        out[str(key)] = path
    return out
