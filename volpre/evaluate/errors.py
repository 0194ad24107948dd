"""The error of the label-efficiency evaluation's inputs."""

from __future__ import annotations

from volpre.errors import UserInputError


class EvaluationError(UserInputError, ValueError):
    """An evaluation input (manifest splits, fractions, seeds, step budget, bundle overrides, export
    arguments) cannot give a valid comparison; the message names the input, what was found and
    what was expected."""
