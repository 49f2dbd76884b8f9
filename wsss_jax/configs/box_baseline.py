"""Box baseline (lower bound): cross-entropy on box-filled masks.

Every training box is filled with its class (smaller box on top); the
network is trained on these masks with plain cross-entropy.  Box2Seg Table 3
reports this "Box" row at 59.3 val mIoU; BANA Table 1 scores the filled boxes
themselves at 62.2 (val) / 65.4 (train) mIoU.

  python -m wsss_jax.main --config=configs/box_baseline.py       # shapes
  python -m wsss_jax.main --config=configs/box_baseline.py:voc   # LargeFOV
  variants: tiny (tests), voc, voc_resnet, coco
"""

from wsss_jax import defaults


def get_config(arg=None):
  config = defaults.base_config('box_baseline', method='box_baseline')
  return defaults.apply_variant(config, arg or '')
