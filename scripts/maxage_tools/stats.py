"""Small statistics shared by the benchmarks and the client-impact table."""

import math


def percentile(values, fraction):
    """Nearest-rank percentile: the smallest value with at least `fraction` of all values at or
    below it (0.99 of 100 values is the 99th). None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]
