"""MS-COCO instances from local files, as a tfds dataset in the example schema.

`builder` converts `instances_*.json` (polygons and RLE) into semantic masks,
edge boxes and image labels for splits `train` and `val`, with the class set
'all' (80 classes) or 'non_voc' (LPG's 60 classes).  Open it through
`wsss_jax.data.registry` (config.data.name 'coco') or prepare it with
`python -m wsss_jax.data.prepare coco --coco_root=...`.
"""

from __future__ import annotations
