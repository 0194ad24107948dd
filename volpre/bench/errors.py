"""The error of a benchmark that cannot run on the given files or options."""

from __future__ import annotations

from volpre.errors import UserInputError


class BenchError(UserInputError, ValueError):
    """The benchmark cannot run on the given manifest, volumes or options; the message names the problem."""
