"""The error of an export whose arguments do not fit (task, network, encoder, weights, sizes, manifest)."""

from __future__ import annotations

from volpre.errors import UserInputError


class ExportError(UserInputError, ValueError):
    """An export argument (or a bundle's config value) does not fit the checkpoint, the task or the
    network; the message names it. ``volpre export`` prints it in one line and exits 2."""
