"""An Ignite handler that counts a trainer's optimiser steps and stops the trainer after a budget of them.

Label-efficiency runs compare arms at an equal number of optimiser steps, whatever the size of
their training subset (a smaller subset has shorter epochs). The count comes from the
optimiser itself (a step post-hook), so an iteration whose step was skipped, e.g. by an fp16
``GradScaler`` after an overflow, does not count. Counting is a Python integer incremented on
the host: no device synchronisation.
"""

from __future__ import annotations

from typing import Any

from ignite.engine import Engine, Events
from torch.optim import Optimizer


class StepBudget:
    """Count the optimiser steps of a trainer and terminate it once ``max_steps`` have run.

    Attach it to a trainer (an Ignite ``Engine``, e.g. MONAI's ``SupervisedTrainer``) before
    ``run()``; afterwards :attr:`steps` holds the optimiser steps actually taken. The check runs
    at the end of every iteration, so a run stops right after its ``max_steps``-th step (or
    earlier, if the trainer runs out of epochs first). ``max_steps=None`` only counts.

    Args:
        max_steps: the step budget (>= 1), or ``None`` for no budget.

    Raises:
        ValueError: ``max_steps`` is not a positive integer or ``None``.
    """

    def __init__(self, max_steps: int | None) -> None:
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"max_steps must be a positive integer or None, got {max_steps!r}")
        self.max_steps = max_steps
        self.steps = 0
        """Optimiser steps taken since :meth:`attach`."""

    def attach(self, engine: Engine, optimizer: Optimizer) -> None:
        """Count every ``optimizer.step()`` from now on, and check the budget after each iteration of ``engine``."""
        optimizer.register_step_post_hook(self._count)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _count(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.steps += 1

    def __call__(self, engine: Engine) -> None:
        if self.max_steps is not None and self.steps >= self.max_steps:
            engine.terminate()
