"""The packaged config `wsss_jax/configs/bana.py` (read it there), under
the `--config=configs/bana.py` spelling of a checkout."""

from wsss_jax.configs.bana import get_config

__all__ = ['get_config']
