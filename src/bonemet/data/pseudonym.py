"""Pseudonymous case and patient ids: a keyed hash (HMAC-SHA256) of the manifest's ids.

With ``data.pseudonymize`` on, every id the pipeline reads from a manifest (``case_id`` and
``patient_id``), or takes from an input's file name in ``bonemet predict``, is replaced by its
pseudonym before anything is computed, logged or written: feature tables, splits, masks, MLflow,
the report and the predictions carry pseudonyms only. The key comes from an environment variable
(``data.pseudonym_key_env``) that the entry point reads; it is never written anywhere. A keyed
hash cannot be reversed: ``bonemet pseudonyms`` maps pseudonyms back by hashing the manifest's
ids again, which needs the same key.
"""

from __future__ import annotations

import hashlib
import hmac

from bonemet.errors import UserError

#: Pseudonyms are "p" + 16 hex digits (64 bits of the HMAC): unique for any realistic cohort.
PREFIX = "p"
DIGITS = 16
#: A key shorter than this is refused (HMAC-SHA256 keys should carry >= 128 bits of entropy).
MIN_KEY_BYTES = 16


class PseudonymKeyError(UserError, ValueError):
    """Pseudonymisation is on but its key is missing or too short."""


def check_key(key: bytes, where: str) -> bytes:
    """``key`` when it is long enough; :class:`PseudonymKeyError` naming ``where`` otherwise."""
    if len(key) < MIN_KEY_BYTES:
        raise PseudonymKeyError(
            f"{where}: the pseudonymisation key has {len(key)} bytes; give at least {MIN_KEY_BYTES} "
            "(e.g. `export BONEMET_PSEUDONYM_KEY=$(openssl rand -hex 32)`), and keep it out of the repository"
        )
    return key


def pseudonym(value: str, key: bytes) -> str:
    """The pseudonym of one id under ``key``: ``p`` + 16 hex digits of HMAC-SHA256(key, id)."""
    digest = hmac.new(key, str(value).encode("utf-8"), hashlib.sha256).hexdigest()
    return PREFIX + digest[:DIGITS]


def key_from_environment(name: str) -> bytes:
    """The pseudonymisation key held by the environment variable ``name`` (``data.pseudonym_key_env``).

    Raises:
        PseudonymKeyError: the variable is unset or the key too short.
    """
    import os

    value = os.environ.get(name)
    if not value:
        raise PseudonymKeyError(
            f"data.pseudonymize is on but ${name} is not set: export the cohort's key (the same one every "
            f"stage and `bonemet pseudonyms` use), e.g. `export {name}=$(openssl rand -hex 32)` once, kept "
            "outside the repository"
        )
    return check_key(value.encode("utf-8"), f"${name}")
