"""Learning-rate schedules fitted to the run's real end: linear warmup, then cosine decay to 10% of the peak
(`cosine`), or a stable peak and a linear cooldown to zero over the last part of the run (`wsd`,
warmup-stable-decay as in MiniCPM and modded-nanogpt)."""

from __future__ import annotations

import math

MIN_LR_RATIO = 0.1  # cosine decay ends at 10% of the peak (GPT-3 / Chinchilla practice)


class Schedule:
    """An LR multiplier of the step: linear warmup to 1 over `warmup_steps`, then each kind's decay ending at
    exactly `total_steps`. Both may be changed after the start (a --max-time run fits them once speed is known);
    the schedule stays continuous because it is a pure function of the step."""

    def __init__(self, total_steps: int, warmup_steps: int):
        self.total_steps, self.warmup_steps = total_steps, warmup_steps

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def can_change_length(self, step: int, total_steps: int) -> bool:
        """Whether the run's length can become `total_steps` after `step` without changing the rate of any step
        from here on."""
        raise NotImplementedError


class WarmupCosine(Schedule):
    """`cosine`: after the warmup, cosine decay to MIN_LR_RATIO at exactly `total_steps`."""

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float = MIN_LR_RATIO):
        super().__init__(total_steps, warmup_steps)
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def can_change_length(self, step: int, total_steps: int) -> bool:
        """Whether the run's length can become `total_steps` after `step` without changing the rate of any step
        from here on (a cosine's rate depends on the length at every step: never)."""
        return False


def warmup_steps_for(warmup: float, total_steps: int) -> int:
    return int(warmup * total_steps) if warmup < 1 else int(warmup)


class WarmupStableDecay(Schedule):
    """`wsd` (the default): after the warmup, 1 until the last `cooldown` fraction of the run, then linearly to 0
    at exactly `total_steps`; a --max-time run fits it once and refits it while the rate is at its peak
    (`can_change_length`)."""

    def __init__(self, total_steps: int, warmup_steps: int, cooldown: float):
        super().__init__(total_steps, warmup_steps)
        self.cooldown = cooldown

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        decay_steps = max(1.0, self.cooldown * self.total_steps)
        return max(0.0, min(1.0, (self.total_steps - step) / decay_steps))

    def can_change_length(self, step: int, total_steps: int) -> bool:
        """True before either length's cooldown: the warmup does not depend on the length (the caller keeps
        `warmup_steps`), and the stable phase is the peak under both."""
        def last_peak_step(total: int) -> float:
            return total - max(1.0, self.cooldown * total)
        return step + 1 <= min(last_peak_step(self.total_steps), last_peak_step(total_steps))


SCHEDULES = ("cosine", "wsd")


def make_schedule(kind: str, total_steps: int, warmup_steps: int, cooldown: float) -> Schedule:
    if kind == "wsd":
        return WarmupStableDecay(total_steps, warmup_steps, cooldown)
    return WarmupCosine(total_steps, warmup_steps)
