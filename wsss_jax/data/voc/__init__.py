"""PASCAL VOC 2012 segmentation (+ SBD / SegmentationClassAug) from local files.

`builder` turns a VOCdevkit/VOC2012 tree into a tfds dataset with splits
`train`, `train_aug` and `val` in the example schema of
`wsss_jax.data.schema`; `parse` reads the raw XML, PNG and SBD .mat files.
Open it through `wsss_jax.data.registry` (config.data.name 'voc') or prepare it
with `python -m wsss_jax.data.prepare voc --voc_root=...`.
"""

from __future__ import annotations
