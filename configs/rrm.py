"""The packaged config `wsss_jax/configs/rrm.py` (read it there), under
the `--config=configs/rrm.py` spelling of a checkout."""

from wsss_jax.configs.rrm import get_config

__all__ = ['get_config']
