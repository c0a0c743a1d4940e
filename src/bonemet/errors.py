"""The root of bonemet's exceptions, and the line between a user's mistake and a bug.

* :class:`BonemetError` is the root of every exception bonemet raises on purpose.
* :class:`UserError` (under it) is a problem with what the user gave: a params key, a file, a
  case, a model alias. The command line prints its message as one sentence and exits 1 (2 for
  :class:`~bonemet.config.ParamsError`, like a usage error). Messages name the case, the file,
  what was expected, what was found, and the fix.
* Anything else (``TypeError``, ``KeyError``, CUDA out of memory, a bug in our code) is never
  re-wrapped as bad input: it reaches the user with its traceback.

Concrete user errors keep ``ValueError`` (or ``FileNotFoundError``) as a second base where they
always had it, so ``except ValueError`` in user code keeps working.
"""

from __future__ import annotations


class BonemetError(Exception):
    """Root of every exception bonemet raises on purpose."""


class UserError(BonemetError):
    """A problem with the user's input (params, files, cases, models): printed as one line, exit 1."""

    exit_code = 1
