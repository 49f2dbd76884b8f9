"""Boxes on a pixel or cell grid (jnp): which cells each box covers.

One rule for every method: a cell belongs to a half-open box [x0, x1) ×
[y0, y1) (input pixels) when its centre, (i + ½)·stride, lies inside.  The
membership is returned separably, rows and columns, so callers contract it
(einsum) or broadcast it without building (B, N, H, W) unless they need it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def centre_membership(boxes: jax.Array, box_labels: jax.Array,
                      grid_hw: tuple[int, int],
                      image_hw: tuple[int, int] | None = None
                      ) -> tuple[jax.Array, jax.Array]:
  """Rows and columns of a grid whose cell centres lie inside each box.

  Args:
    boxes: (B, N, 4) float [x0, y0, x1, y1], half-open, input pixels.
    box_labels: (B, N) int; rows with a label < 1 are padding (cover
      nothing).
    grid_hw: (h, w) cells.
    image_hw: (H, W) input pixels the grid spans (default: the grid itself,
      stride 1).
  Returns:
    (in_y (B, N, h), in_x (B, N, w)) bool; cell (u, v) is inside box n iff
    in_y[..., n, u] & in_x[..., n, v].
  """
  h, w = int(grid_hw[0]), int(grid_hw[1])
  height, width = image_hw if image_hw is not None else (h, w)
  boxes = jnp.asarray(boxes, jnp.float32)
  real = (jnp.asarray(box_labels) >= 1)[..., None]
  cy = (jnp.arange(h, dtype=jnp.float32) + 0.5) * (height / h)
  cx = (jnp.arange(w, dtype=jnp.float32) + 0.5) * (width / w)
  in_y = (cy >= boxes[..., 1:2]) & (cy < boxes[..., 3:4]) & real
  in_x = (cx >= boxes[..., 0:1]) & (cx < boxes[..., 2:3]) & real
  return in_y, in_x
