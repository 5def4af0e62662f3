"""The one timing loop the benchmarks share: alternating rounds, medians compared.

These machines are noisy, so no benchmark times one call after another in blocks: each round runs
every call once, in turn, and the medians over the rounds are compared (a burst of load then hits
every call alike). Warm-up is the caller's (what it needs differs: one image, a full call, a check
that two calls agree).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternating_medians(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each call over ``rounds`` rounds that run every call once, in turn."""
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}
