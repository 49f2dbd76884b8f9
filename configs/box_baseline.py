"""The packaged config `wsss_jax/configs/box_baseline.py` (read it there), under
the `--config=configs/box_baseline.py` spelling of a checkout."""

from wsss_jax.configs.box_baseline import get_config

__all__ = ['get_config']
