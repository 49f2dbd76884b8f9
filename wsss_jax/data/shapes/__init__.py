"""The embedded synthetic benchmark "shapes" (generated locally, no download).

`render` draws examples with numpy; `builder` caches them as a tfds dataset
opened through `wsss_jax.data.registry` (config.data.name 'shapes' for the
main family, 'shapes_aux' for the auxiliary family used by LPG).
"""

from __future__ import annotations

from wsss_jax.data.shapes.render import class_names
from wsss_jax.data.shapes.render import render_example

__all__ = ['class_names', 'render_example']
