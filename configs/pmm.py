"""The packaged config `wsss_jax/configs/pmm.py` (read it there), under
the `--config=configs/pmm.py` spelling of a checkout."""

from wsss_jax.configs.pmm import get_config

__all__ = ['get_config']
