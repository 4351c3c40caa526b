"""Which sampler step a call belongs to, and what each step does."""
from __future__ import annotations

from enum import Enum
from typing import Callable, Sequence


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


def noise_progress(percent_to_sigma: Callable[[float], float], sample_sigmas: Sequence[float]) -> list:
    """Each step's denoising progress by noise level, in [0, 1]: the percent p of the model's sampling at the
    step's first sigma (``percent_to_sigma(p)`` equals it; 0 is pure noise, 1 clean), the scale of
    ComfyUI's start/end percent inputs. A run that covers only part of a schedule (KSamplerAdvanced's
    start/end steps, the two experts of Wan 2.2) so knows where its steps lie; for a whole run with evenly
    spaced timesteps it is step / steps."""
    progress = []
    for sigma in list(sample_sigmas)[:-1]:
        sigma = float(sigma)
        low, high = 0.0, 1.0  # percent_to_sigma decreases from pure noise (0) to clean (1)
        for _ in range(30):
            middle = 0.5 * (low + high)
            if float(percent_to_sigma(middle)) > sigma:
                low = middle
            else:
                high = middle
        progress.append(round(0.5 * (low + high), 6))
    return progress


def phase_of(step: int, warmup_steps: int) -> Phase:
    """Warm-up steps run dense; the last of them calibrates; with no warm-up, step 0 calibrates lazily."""
    if step < warmup_steps - 1:
        return Phase.WARMUP
    if step == warmup_steps - 1:
        return Phase.CALIBRATE
    return Phase.SPARSE
