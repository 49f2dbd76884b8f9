"""The packaged config `wsss_jax/configs/lpg.py` (read it there), under
the `--config=configs/lpg.py` spelling of a checkout."""

from wsss_jax.configs.lpg import get_config

__all__ = ['get_config']
