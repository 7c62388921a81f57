"""Learning-rate schedules as pure functions of the step, so a checkpoint only needs the step count."""

from __future__ import annotations

import math

from phiforge.train.config import ScheduleSection


def lr_multiplier(step: int, total_steps: int, s: ScheduleSection) -> float:
    """Factor on the peak lr for optimizer step ``step`` (0-based) of ``total_steps``.

    constant: linear warmup, then 1.   cosine: warmup, then half a cosine down to min_lr_ratio.
    linear:   warmup, then a straight line down to min_lr_ratio at the last step.
    wsd:      warmup, stable at 1, then the last decay_fraction of the steps decays (linear or 1-sqrt).
    """
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    if s.kind == "constant":
        return 1.0
    if s.kind == "wsd":
        decay_steps = max(1, round(total_steps * s.decay_fraction))
        start = total_steps - decay_steps
        if step < start:
            return 1.0
        progress = (step - start + 1) / decay_steps
        falloff = progress if s.decay_shape == "linear" else math.sqrt(progress)
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * (1 - falloff)
    span = max(1, total_steps - s.warmup_steps)
    progress = min(1.0, (step - s.warmup_steps + 1) / span)
    if s.kind == "cosine":
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * (1 - progress)  # linear
