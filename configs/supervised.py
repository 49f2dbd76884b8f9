"""The packaged config `wsss_jax/configs/supervised.py` (read it there), under
the `--config=configs/supervised.py` spelling of a checkout."""

from wsss_jax.configs.supervised import get_config

__all__ = ['get_config']
