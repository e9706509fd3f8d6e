"""Random draws the phantom is built from: uniform draws mapped onto ranges, unit vectors, smooth noise textures.

Pure functions of their arguments (the generator passes its own seeded ``numpy`` generators), so a phantom sample stays
a function of ``(seed, split, index)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["count_in", "scaled", "smooth_noise_bank", "spread_unit_vectors", "unit_vectors"]


def scaled(uniform: Any, value_range: tuple[float, float]) -> Any:
    """Map uniform [0, 1) draws (float or array) linearly onto ``value_range``."""
    return value_range[0] + (value_range[1] - value_range[0]) * uniform


def count_in(uniform: float, count_range: tuple[int, int]) -> int:
    """Map a uniform [0, 1) draw onto the integers ``count_range[0]..count_range[1]`` (inclusive)."""
    return count_range[0] + int(uniform * (count_range[1] - count_range[0] + 1))


def unit_vectors(rng: np.random.Generator, count: int, spatial_dims: int) -> np.ndarray:
    """``count`` random unit vectors in ``spatial_dims`` dimensions, (count, spatial_dims)."""
    if count == 0:
        return np.zeros((0, spatial_dims))
    vectors = rng.standard_normal((count, spatial_dims))
    return vectors / np.maximum(np.sqrt((vectors * vectors).sum(axis=1, keepdims=True)), 1e-12)


def spread_unit_vectors(rng: np.random.Generator, count: int, spatial_dims: int) -> np.ndarray:
    """``count`` random unit vectors, preferring ones at least 50 degrees apart (distinct lobes)."""
    if count == 0:
        return np.zeros((0, spatial_dims))
    candidates = unit_vectors(rng, 4 * count, spatial_dims)
    cosines = (candidates @ candidates.T).tolist()
    chosen: list[int] = []
    for index, row in enumerate(cosines):
        if all(row[other] < 0.64 for other in chosen):
            chosen.append(index)
    chosen += [index for index in range(4 * count) if index not in chosen][: max(count - len(chosen), 0)]
    return candidates[chosen[:count]]


def smooth_noise_bank(
    rng: np.random.Generator, shape: tuple[int, ...], spacing_mm: tuple[float, ...], count: int, sigma_mm: float
) -> np.ndarray:
    """``count`` periodic Gaussian-filtered noise fields (zero mean, unit std) of twice ``shape``, float32.

    The filter's standard deviation is ``sigma_mm`` in physical units (the grid's spacing is ``spacing_mm``).
    """
    big = tuple(2 * n for n in shape)
    frequencies = [np.fft.fftfreq(n, d=s) for n, s in zip(big[:-1], spacing_mm[:-1], strict=True)]
    frequencies.append(np.fft.rfftfreq(big[-1], d=spacing_mm[-1]))
    squared = sum(f.reshape([-1 if a == i else 1 for a in range(len(big))]) ** 2 for i, f in enumerate(frequencies))
    lowpass = np.exp(-2.0 * math.pi**2 * sigma_mm**2 * squared)
    bank = np.empty((count, *big), dtype=np.float32)
    for field in bank:  # one at a time, to bound memory for large volumes
        smooth = np.fft.irfftn(np.fft.rfftn(rng.standard_normal(big)) * lowpass, s=big)
        field[...] = (smooth - smooth.mean()) / smooth.std()
    return bank
