"""Which sampler step a call belongs to, and what each step does."""
from __future__ import annotations

from enum import Enum
from typing import Sequence


class Phase(Enum):
    WARMUP = "warm-up step"  # dense output, nothing computed
    CALIBRATE = "calibration step"  # dense output, clustering computed and cached
    SPARSE = "sparse"


def step_from_sigmas(sigma: float, sample_sigmas: Sequence[float]) -> int:
    """Index of the sampler step that evaluates the model at ``sigma``.

    ``sample_sigmas`` is the run's schedule (steps + 1 values, decreasing). Step i covers the interval
    from sigmas[i] down to (but excluding) sigmas[i + 1], so samplers that evaluate the model twice per
    step (Heun, DPM++ 2S) or at intermediate sigmas land in the right step."""
    sigmas = [float(s) for s in sample_sigmas]
    steps = max(1, len(sigmas) - 1)
    sigma = float(sigma)
    tolerance = 1e-5 * max(1.0, abs(sigma))
    for i in range(steps):
        high, low = sigmas[i], sigmas[i + 1]
        if high >= low:
            if low + tolerance < sigma <= high + tolerance or abs(sigma - high) <= tolerance:
                return i
        elif high - tolerance <= sigma < low - tolerance:  # increasing schedules
            return i
    # Outside the schedule: nearest schedule point, clamped to a valid step.
    nearest = min(range(len(sigmas)), key=lambda i: abs(sigmas[i] - sigma))
    return min(nearest, steps - 1)


def phase_of(step: int, warmup_steps: int) -> Phase:
    """Warm-up steps run dense; the last of them calibrates; with no warm-up, step 0 calibrates lazily."""
    if step < warmup_steps - 1:
        return Phase.WARMUP
    if step == warmup_steps - 1:
        return Phase.CALIBRATE
    return Phase.SPARSE
