"""Fully supervised upper bound: train on ground-truth masks.

  python -m wsss_jax.main --config=configs/supervised.py         # shapes
  python -m wsss_jax.main --config=configs/supervised.py:voc     # LargeFOV
  variants: tiny (tests), voc, voc_resnet, coco
"""

from wsss_jax import defaults


def get_config(arg=None):
  config = defaults.base_config('supervised', method='supervised')
  return defaults.apply_variant(config, arg or '')
