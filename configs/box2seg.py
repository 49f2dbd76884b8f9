"""The packaged config `wsss_jax/configs/box2seg.py` (read it there), under
the `--config=configs/box2seg.py` spelling of a checkout."""

from wsss_jax.configs.box2seg import get_config

__all__ = ['get_config']
