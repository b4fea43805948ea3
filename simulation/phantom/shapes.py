"""Signed-distance primitives of the phantom (negative inside), evaluated on broadcast coordinate arrays."""

from __future__ import annotations

import numpy as np

Coords = tuple[np.ndarray, np.ndarray, np.ndarray]


def floats(v) -> tuple[float, ...]:
    """Python floats, so float32 coordinate arrays stay float32 (NumPy 2 promotion rules)."""
    return tuple(float(e) for e in v)


def unit(v: np.ndarray) -> np.ndarray:
    """``v`` scaled to length 1 (float64)."""
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def random_unit(rng: np.random.Generator) -> np.ndarray:
    """A random direction (unit float64 3-vector)."""
    return unit(rng.normal(size=3))


def dot(x, y, z, c, d) -> np.ndarray:
    """``(p - c) . d`` for coordinate arrays ``p = (x, y, z)``."""
    c, d = floats(c), floats(d)
    return (x - c[0]) * d[0] + (y - c[1]) * d[1] + (z - c[2]) * d[2]


def dist(x, y, z, c) -> np.ndarray:
    """Distance of each point to ``c``."""
    c = floats(c)
    return np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)


def sphere(x, y, z, c, r) -> np.ndarray:
    """Sphere of radius ``r`` around ``c``."""
    return dist(x, y, z, c) - r


def capsule(x, y, z, a, b, r) -> np.ndarray:
    """Distance to the segment a-b minus r."""
    ab = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    length2 = float(ab @ ab)
    a, ab = floats(a), floats(ab)
    t = np.clip(((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) * (1.0 / length2), 0.0, 1.0)
    return (
        np.sqrt((x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2) - r
    )


def ellipsoid(x, y, z, c, semi) -> np.ndarray:
    """Approximate SDF of an axis-aligned ellipsoid (exact on the surface, scaled inside)."""
    c, semi = floats(c), floats(semi)
    k = np.sqrt(((x - c[0]) / semi[0]) ** 2 + ((y - c[1]) / semi[1]) ** 2 + ((z - c[2]) / semi[2]) ** 2)
    return (k - 1.0) * float(min(semi))


def elliptic_cylinder(
    x, y, z, centre: tuple[float, float], semi: tuple[float, float], shrink=0.0
) -> np.ndarray:
    """Approximate SDF of a cylinder along z with an elliptic section, its semi-axes less ``shrink``."""
    bx, by = centre
    ax, ay = semi
    k = np.sqrt(((x - bx) / (ax - shrink)) ** 2 + ((y - by) / (ay - shrink)) ** 2)
    return (k - 1.0) * (ay - shrink)


def shell(sdf: np.ndarray, inner: float, outer: float) -> np.ndarray:
    """SDF of the layer ``inner < sdf < outer`` of another SDF."""
    mid, half = 0.5 * (inner + outer), 0.5 * (outer - inner)
    return np.abs(sdf - mid) - half


def spherical_shell(x, y, z, c, inner: float, outer: float) -> np.ndarray:
    """SDF of the points whose distance to ``c`` lies between ``inner`` and ``outer``."""
    return shell(dist(x, y, z, c), inner, outer)


def box(centre, half) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned bounds ``(lo, hi)`` of ``centre +- half`` (``half`` a scalar or a 3-vector)."""
    centre = np.asarray(centre, dtype=np.float64)
    half = np.broadcast_to(np.asarray(half, dtype=np.float64), (3,))
    return centre - half, centre + half
