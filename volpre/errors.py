"""volpre's error root, the one place the command line decides how an error is reported.

- :class:`VolpreError`: every error volpre raises on purpose.
- :class:`UserInputError`: the user's input is the cause (a file, a manifest, a config value, an
  option, a checkpoint that does not fit): ``volpre`` prints one line naming the problem and exits 2.

Anything else that leaves a command is a bug and is reported with its traceback. Each concrete
error also keeps the built-in base it always had (``ValueError``, ``OSError``, ``RuntimeError``),
so code that catches those still does. This module imports nothing of volpre: every layer may use it.
"""

from __future__ import annotations


class VolpreError(Exception):
    """An error volpre raises on purpose."""


class UserInputError(VolpreError):
    """The user's input is the cause: reported in one line, exit status 2, no traceback."""
