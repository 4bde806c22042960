"""Learning-rate schedules (open_clip_train's three shapes) and what a resume with a new budget does.

``cosine``: linear warmup, then a cosine to 0 at the last step. ``const``: warmup, then the base lr.
``const-cooldown``: warmup, the base lr, then the last ``cooldown_steps`` decay as
``(1 - e)^power`` to ``cooldown_end_lr`` (open_clip's ``const_lr_cooldown``).

A resume that changes the schedule (``--set train.max_steps=…`` and friends) never raises the
learning rate past warmup: the new schedule applies from the resumed step when it lies at or below
the lr the run stands at, and otherwise the lr decays from where it stands to the new end in the
schedule's own shape. So a longer ``cosine`` budget cools down from the current lr along a half
cosine (a shorter one follows the new, lower cosine); ``const`` stays where it is; a
``const-cooldown`` whose cooldown had not begun moves it to the new end, and one already cooling
down continues from its current lr to ``cooldown_end_lr`` at the new end.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

TOLERANCE = 1e-9  # a factor this close to the current one is the same lr (float rounding of a restart)


@dataclass(frozen=True)
class Schedule:
    """The factor of the base lr at a step: the ``lr_lambda`` of a ``LambdaLR``, whose state dict
    then carries these fields (plain types, so a checkpoint stays ``weights_only`` loadable)."""

    kind: str
    warmup: int
    total: int
    cooldown: int = 0
    power: float = 1.0
    end: float = 0.0  # const-cooldown's final factor (cooldown_end_lr / lr)
    from_step: int | None = None  # set by a resume that changed the budget: the decay starts here ...
    from_factor: float = 1.0  # ... from this factor

    def __call__(self, step: int) -> float:
        if self.from_step is not None and step >= self.from_step:
            return self._decay(self.from_factor, (step - self.from_step) / max(1, self.total - self.from_step))
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "cosine":
            return self._decay(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "const-cooldown" and step >= self.total - self.cooldown:
            return self._decay(1.0, (step - (self.total - self.cooldown)) / max(1, self.cooldown))
        return 1.0

    def _decay(self, start: float, progress: float) -> float:
        """From ``start`` at progress 0 to the end factor at 1, in this schedule's shape."""
        e = min(1.0, progress)
        if self.kind == "cosine":
            return start * 0.5 * (1 + math.cos(math.pi * e))
        if self.kind == "const-cooldown":
            return self.end + (start - self.end) * (1 - e) ** self.power
        return start  # const: no decay

    def resumed(self, current: float, step: int) -> Schedule:
        """This (the config's) schedule for a run resumed at ``step`` whose lr factor is ``current``:
        itself when it does not raise the lr there, else a decay from ``current`` to the end."""
        if step < self.warmup or self(step) <= current * (1 + TOLERANCE) + TOLERANCE:
            return self
        return dataclasses.replace(self, from_step=step, from_factor=current)


def schedule_from_config(optim, total: int) -> Schedule:
    """The :class:`Schedule` of an :class:`~cliplab.config.OptimConfig` over ``total`` steps."""
    return Schedule(kind=optim.schedule, warmup=optim.warmup_steps, total=total, cooldown=optim.cooldown_steps,
                    power=optim.cooldown_power, end=optim.cooldown_end_lr / optim.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, optim, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`schedule_from_config`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_from_config(optim, total))


def restore_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, saved: dict, step: int) -> Schedule:
    """Load a checkpoint's scheduler state into ``scheduler`` (built from the resumed config) and
    return the schedule the run continues on. The checkpoint's schedule continues unchanged when
    the config's is the same; otherwise :meth:`Schedule.resumed` decides, from the factor the run
    stood at (its schedule's, or for a checkpoint from before schedules were saved, its lr over its
    base lr). The optimizer's lr is set to the continued schedule's at ``step``."""
    wanted: Schedule = scheduler.lr_lambdas[0]
    fields = (saved.get("lr_lambdas") or [None])[0]
    old = Schedule(**fields) if isinstance(fields, dict) else None
    if old is not None and dataclasses.replace(old, from_step=None, from_factor=1.0) == wanted:
        new = old  # a plain restart: the same schedule, including a decay an earlier resume began
    else:
        current = old(step) if old is not None else saved["_last_lr"][0] / saved["base_lrs"][0]
        new = wanted.resumed(current, step)
    scheduler.load_state_dict({**saved, "lr_lambdas": [dataclasses.asdict(new)] * len(scheduler.lr_lambdas)})
    scheduler._last_lr = [base * new(step) for base in scheduler.base_lrs]
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler._last_lr, strict=True):
        group["lr"] = lr
    return new
