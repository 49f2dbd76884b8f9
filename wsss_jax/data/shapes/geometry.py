"""Shape families of the "shapes" benchmark as signed-distance functions.

Every shape lives in a unit-radius object frame (u to the right, v down,
both in units of the object radius) and fits within a disc of `reach` radii
(at most sqrt(2)).  Signed distances are negative inside; multiplied by the
radius they are in pixels, which the renderer uses for the antialiased edge
and the mask (pixel centre inside <=> distance < 0).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Sdf = Callable[[np.ndarray, np.ndarray], np.ndarray]


def shape_sdf(shape: str, rng: np.random.Generator) -> tuple[Sdf, float]:
  """(sdf, reach): a signed-distance function in the unit-radius frame with
  sampled shape parameters, and the radius of a disc containing the shape.

  Ring and polygon distances are exact; the superellipse uses the usual
  first-order approximation (exact on circles) and the crescent (disc minus
  disc) the max of the two disc distances (exact on its edges except near the
  horns).  Only the sign and the distance within ~1 px of the edge matter.
  """
  u01 = rng.uniform
  if shape == 'ellipse':      # superellipse |u|^n + |v/b|^n <= 1
    b, n = u01(0.55, 1.0), u01(2.0, 4.0)
    return (lambda u, v: ((np.abs(u) ** n + np.abs(v / b) ** n) ** (1 / n)
                          - 1) * b), float(np.hypot(1.0, b))
  if shape == 'ring':
    inner = u01(0.45, 0.65)
    return (lambda u, v: np.maximum(np.hypot(u, v) - 1,
                                    inner - np.hypot(u, v))), 1.0
  if shape == 'crescent':
    inner, shift = u01(0.65, 0.9), u01(0.3, 0.55)
    return (lambda u, v: np.maximum(np.hypot(u, v) - 1,
                                    inner - np.hypot(u - shift, v))), 1.0
  if shape == 'semicircle':   # a half disc, flat side down, centred on its box
    return (lambda u, v: np.maximum(np.hypot(u, v - 0.5) - 1, v - 0.5)), 1.12
  if shape == 'capsule':      # a segment of half-length a, thickened by r
    a, r = u01(0.35, 0.6), u01(0.3, 0.4)
    return (lambda u, v: np.hypot(u - np.clip(u, -a, a), v) - r), a + r
  vertices = polygon(shape, rng)
  reach = float(np.hypot(vertices[:, 0], vertices[:, 1]).max())
  return (lambda u, v: polygon_sdf(vertices, u, v)), reach


def polygon(shape: str, rng: np.random.Generator) -> np.ndarray:
  """(E, 2) float32 vertices (u, v) of a polygonal shape; v points down."""
  u01 = rng.uniform
  if shape in ('triangle', 'polygon', 'star'):
    if shape == 'triangle':
      angles = np.deg2rad([-90.0, 30.0 + u01(-25, 25), 150.0 + u01(-25, 25)])
      radii = np.ones(3)
    elif shape == 'polygon':
      sides = int(rng.integers(5, 7))
      angles = -np.pi / 2 + 2 * np.pi * np.arange(sides) / sides
      radii = np.ones(sides)
    else:
      points = int(rng.integers(5, 7))
      angles = -np.pi / 2 + np.pi * np.arange(2 * points) / points
      radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, u01(0.45, 0.62))
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)],
                    -1).astype(np.float32)
  if shape == 'cross':
    t, top = u01(0.22, 0.38), u01(0.6, 1.0)
    pts = [(-t, -top), (t, -top), (t, -t), (1, -t), (1, t), (t, t), (t, 1),
           (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
  elif shape == 'heart':
    s = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    pts = np.stack([16 * np.sin(s) ** 3, -(13 * np.cos(s) - 5 * np.cos(2 * s)
                                           - 2 * np.cos(3 * s) - np.cos(4 * s))
                    ], -1) / 17.0
  elif shape == 'arrow':
    w, head, length = u01(0.14, 0.24), u01(0.45, 0.65), u01(0.4, 0.65)
    tip = 1 - length
    pts = [(-1, -w), (tip, -w), (tip, -head), (1, 0), (tip, head), (tip, w),
           (-1, w)]
  elif shape == 'lshape':
    tx, ty = u01(0.55, 0.9), u01(0.55, 0.9)
    pts = [(-1, -1), (-1 + tx, -1), (-1 + tx, 1 - ty), (1, 1 - ty), (1, 1),
           (-1, 1)]
    pts = np.asarray(pts) * 0.8
  elif shape == 'bowtie':
    h, w = u01(0.5, 0.85), u01(0.1, 0.22)
    pts = [(-1, -h), (0, -w), (1, -h), (1, h), (0, w), (-1, h)]
  elif shape == 'diamond':
    w = u01(0.5, 0.8)
    pts = [(0, -1), (w, 0), (0, 1), (-w, 0)]
  elif shape == 'trapezoid':
    top, h = u01(0.3, 0.6), u01(0.55, 0.8)
    pts = [(-top, -h), (top, -h), (1, h), (-1, h)]
  elif shape == 'tee':
    t, bar = u01(0.18, 0.3), u01(0.22, 0.35)
    pts = [(-1, -0.8), (1, -0.8), (1, -0.8 + bar), (t, -0.8 + bar), (t, 1),
           (-t, 1), (-t, -0.8 + bar), (-1, -0.8 + bar)]
  elif shape == 'chevron':
    t, d = u01(0.3, 0.45), u01(0.5, 0.8)
    pts = [(-1, -d / 2), (0, d / 2), (1, -d / 2), (1, -d / 2 + t),
           (0, d / 2 + t), (-1, -d / 2 + t)]
  elif shape == 'wave':
    s = np.linspace(-1, 1, 10)
    centre = u01(0.25, 0.4) * np.sin(np.pi * u01(1.0, 1.8) * s + u01(0, 6.3))
    half = u01(0.14, 0.22)
    pts = np.concatenate([np.stack([s, centre - half], -1),
                          np.stack([s, centre + half], -1)[::-1]])
  else:
    raise ValueError(f'Unknown shape {shape!r}.')
  return np.asarray(pts, np.float32)


def polygon_sdf(vertices: np.ndarray, u: np.ndarray,
                v: np.ndarray) -> np.ndarray:
  """Exact signed distance to a simple polygon (negative inside), even-odd.

  Args:
    vertices: (E, 2) float32 (u, v) vertices, either orientation.
    u, v: float32 arrays of one shape (...), the query points.

  Returns:
    float32 (...) signed distances.  Works on (..., E) temporaries, updated
    in place because this is the renderer's hot spot.
  """
  a = vertices
  e = np.roll(vertices, -1, axis=0) - a
  eu, ev = e[:, 0], e[:, 1]
  pu = u[..., None] - a[:, 0]
  pv = v[..., None] - a[:, 1]
  # h = clip(<p - a, e> / |e|^2, 0, 1): the closest point a + h e of each edge.
  h = pu * eu
  h += pv * ev
  h *= 1 / (eu * eu + ev * ev)
  np.clip(h, 0, 1, out=h)
  du = np.subtract(pu, eu * h)
  h *= ev
  dv = np.subtract(pv, h, out=h)
  du *= du
  dv *= dv
  du += dv
  dist = np.sqrt(du.min(axis=-1))
  # Even-odd ray casting to +u.  The row test compares vertex coordinates
  # directly (not pv < ev) so that a vertex exactly on a row counts once.
  slope = eu / np.where(ev == 0, 1, ev)
  end_v = np.roll(vertices[:, 1], -1)
  crosses = (a[:, 1] > v[..., None]) != (end_v > v[..., None])
  pv *= slope
  crosses &= pu < pv
  inside = np.logical_xor.reduce(crosses, axis=-1)
  return np.where(inside, -dist, dist)
