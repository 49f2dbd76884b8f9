"""tfds builder for MS-COCO instances in the wsss_jax schema: `train`, `val`.

Inputs (`wsss_jax.defaults.coco_data`): `root` holding the annotation files
(`train_annotations`, `val_annotations`, relative to root) and the image
folders `train_images` / `val_images`, either directly under root (the
official layout) or under root/images/.  A split whose annotation file or
image folder is missing is not built (the prepare step says so).

Classes (`class_set`): 'all' = the 80 categories in ascending COCO id order ->
ids 1..80; 'non_voc' = LPG's auxiliary set: the 20 VOC categories
(`VOC_COCO_IDS`) are dropped and the other 60, ascending, -> 1..60.  Metadata
`category_map` maps each kept COCO id (string key) to {'id', 'name'}.

Per image:
* boxes: every non-crowd annotation of a kept class; bbox [x, y, w, h] ->
  edge box [floor(x), floor(y), ceil(x + w), ceil(y + h)], clipped to the
  image; boxes left without a pixel are dropped (counted).  Crowd annotations
  give no box.  Image labels = the classes of the boxes.
* mask: crowd regions of kept classes are 255 (ignore); then the non-crowd
  instance masks (polygons or RLE, via pycocotools) are painted largest area
  first, so a smaller object lying on a larger one stays visible (ties: later
  annotation on top); an instance pixel overrides a crowd pixel.  Annotations
  of dropped classes are not painted: their pixels are background, as in LPG's
  code (which paints only the kept classes).
* Images without annotations (or, for 'non_voc', without a kept object) are
  kept, all background with no box; they are counted in metadata `counts`.
* Corrupt images and images whose size differs from the JSON are skipped and
  listed in metadata `skipped`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re

import numpy as np
from pycocotools import mask as mask_utils
import tensorflow_datasets as tfds

from wsss_jax.data import boxes as box_utils
from wsss_jax.data import prepare as prep
from wsss_jax.data import schema
from wsss_jax.data.registry import DatasetError

# COCO category ids of the 20 PASCAL VOC classes (LPG's COCO-60 removes them).
VOC_COCO_IDS = frozenset(
    (1, 2, 3, 4, 5, 6, 7, 9, 16, 17, 18, 19, 20, 21, 44, 62, 63, 64, 67, 72))
NUM_FOREGROUND = {'all': 80, 'non_voc': 60}
_SPLITS = ('train', 'val')


def category_table(categories: list[dict], class_set: str, source: str
                   ) -> tuple[dict[int, int], list[str]]:
  """Maps COCO category ids to our ids 1..K for a class set.

  Args:
    categories: the JSON's `categories` entries ({'id', 'name', ...}).
    class_set: 'all' or 'non_voc'.
    source: file name for error messages.

  Returns:
    ({coco_id: our_id} for kept categories, class names with 'background'
    first).

  Raises:
    DatasetError: unknown class set, or not the 80 standard categories.
  """
  if class_set not in NUM_FOREGROUND:
    raise DatasetError(f'config.data.coco.class_set={class_set!r}; expected '
                       f'one of {sorted(NUM_FOREGROUND)}.')
  names = {int(c['id']): str(c['name']) for c in categories}
  if len(names) != 80 or not VOC_COCO_IDS <= set(names):
    raise DatasetError(f'{source}: expected the 80 COCO categories (VOC ids '
                       f'{sorted(VOC_COCO_IDS)} included); found {len(names)}.')
  kept = sorted(i for i in names
                if class_set == 'all' or i not in VOC_COCO_IDS)
  return ({coco_id: index + 1 for index, coco_id in enumerate(kept)},
          ['background'] + [names[i] for i in kept])


def edge_box(bbox: list[float]) -> tuple[int, int, int, int]:
  """COCO [x, y, w, h] (continuous) -> int edge box covering it."""
  x, y, w, h = (float(v) for v in bbox)
  return (math.floor(x), math.floor(y), math.ceil(x + w), math.ceil(y + h))


def annotation_rle(segmentation, height: int, width: int):
  """pycocotools RLE of a polygon list / uncompressed / compressed RLE.

  Polygons with fewer than 3 points are ignored; None if nothing is left.

  Raises:
    prep.BadFileError: an RLE whose size is not (height, width).
  """
  if isinstance(segmentation, list):
    polygons = [p for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]
    if not polygons:
      return None
    return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
  if not isinstance(segmentation, dict) or 'counts' not in segmentation:
    return None
  if list(segmentation.get('size', ())) != [height, width]:
    raise prep.BadFileError(f'RLE size {segmentation.get("size")} != image '
                            f'size [{height}, {width}]')
  counts = segmentation['counts']
  if isinstance(counts, list):
    return mask_utils.frPyObjects(segmentation, height, width)
  if isinstance(counts, str):
    counts = counts.encode('ascii')
  return {'size': [height, width], 'counts': counts}


def paint_mask(masks: np.ndarray, labels: np.ndarray, crowd: np.ndarray
               ) -> np.ndarray:
  """Semantic label map from instance masks (the paint order of the module doc).

  Args:
    masks: (N, H, W) bool instance masks.
    labels: (N,) int class ids 1..K.
    crowd: (N,) bool, True for crowd regions.

  Returns:
    (H, W) uint8: 0 background, 1..K, 255 for crowd pixels no instance covers.
  """
  masks = np.asarray(masks, bool)
  labels = np.asarray(labels)
  crowd = np.asarray(crowd, bool)
  out = np.zeros(masks.shape[1:], np.uint8)
  if crowd.any():
    out[masks[crowd].any(axis=0)] = schema.IGNORE_LABEL
  instances = np.flatnonzero(~crowd)
  areas = masks.sum(axis=(1, 2))[instances]
  # One masked write per object (a few dozen at most); later writes win.
  for index in instances[box_utils.paint_order_by_area(areas)]:
    out[masks[index]] = labels[index]
  return out


def resolve_paths(coco_config) -> tuple[dict[str, tuple[str, str]], list[str]]:
  """Finds the inputs of each split.

  Returns:
    ({split: (images dir, annotation file)} for the splits whose inputs
    exist, one line per missing split).

  Raises:
    DatasetError: root missing, or no split has both inputs.
  """
  root = coco_config.root
  if not root:
    raise DatasetError(
        'config.data.coco.root is empty; set it or run '
        '`python -m wsss_jax.data.prepare coco --coco_root=...`.')
  if not os.path.isdir(root):
    raise DatasetError(f'COCO root {root} does not exist; expected a folder '
                       'with annotations/instances_*.json and image folders.')
  found, missing = {}, []
  for split in _SPLITS:
    folder = coco_config[f'{split}_images']
    candidates = [os.path.join(root, folder),
                  os.path.join(root, 'images', folder)]
    images = next((c for c in candidates if os.path.isdir(c)), '')
    annotations = os.path.join(root, coco_config[f'{split}_annotations'])
    if images and os.path.isfile(annotations):
      found[split] = (images, annotations)
    else:
      missing.append(f'{split}: skipped, missing '
                     + (f'{annotations}' if images else f'{candidates[0]} '
                        f'(or {candidates[1]})'))
  if not found:
    raise DatasetError(f'No COCO split found under {root}: '
                       + '; '.join(missing))
  return found, missing


def load_annotations(path: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise DatasetError(f'{path}: cannot read COCO instances JSON: {e}') from e
  for key in ('images', 'annotations', 'categories'):
    if key not in data:
      raise DatasetError(f'{path}: no {key!r} list; expected a COCO instances '
                         'file (instances_*.json).')
  return data


def make_example(image_entry: dict, annotations: list[dict], images_dir: str,
                 id_map: dict[int, int], num_foreground: int, split: str,
                 stats: prep.PrepStats) -> dict:
  """One image's feature dict.

  Raises:
    prep.BadFileError: the image must be skipped (reason in the message).
  """
  path = os.path.join(images_dir, image_entry['file_name'])
  image = prep.read_image(path)
  height, width = int(image_entry['height']), int(image_entry['width'])
  if (image.height, image.width) != (height, width):
    raise prep.BadFileError(f'image size {image.width}x{image.height} != JSON '
                            f'size {width}x{height}')
  kept = [a for a in annotations if a['category_id'] in id_map]
  rles, labels, crowd, boxes, box_labels = [], [], [], [], []
  without_mask = 0
  for ann in kept:
    label = id_map[ann['category_id']]
    is_crowd = bool(ann.get('iscrowd', 0))
    if not is_crowd:
      boxes.append(edge_box(ann['bbox']))
      box_labels.append(label)
    rle = annotation_rle(ann.get('segmentation'), height, width)
    if rle is None:
      without_mask += 1
      continue
    rles.append(rle)
    labels.append(label)
    crowd.append(is_crowd)
  if rles:
    masks = np.moveaxis(mask_utils.decode(rles), -1, 0)
    mask = paint_mask(masks, np.asarray(labels), np.asarray(crowd))
  else:
    mask = np.zeros((height, width), np.uint8)
  boxes, box_labels, dropped = box_utils.clip_boxes(
      np.asarray(boxes, np.int32).reshape(-1, 4),
      np.asarray(box_labels, np.int32), height, width)
  # Counted only now: an image skipped above must not count.
  stats.count(split, 'annotations_without_mask', without_mask)
  stats.count(split, 'boxes_dropped', dropped)
  stats.count(split, 'images_without_annotations', int(not annotations))
  stats.count(split, 'images_without_boxes', int(len(boxes) == 0))
  stats.count(split, 'crowd_regions', int(np.sum(crowd)))
  stats.count(split, 'images_reencoded', int(image.reencoded))
  return {
      schema.IMAGE: image.data,
      schema.MASK: prep.mask_image(mask),
      schema.BOXES: boxes.astype(np.int32),
      schema.BOX_LABELS: box_labels.astype(np.int32),
      schema.IMAGE_LABELS: schema.image_labels_from_ids(box_labels,
                                                        num_foreground),
      schema.IMAGE_ID: os.path.splitext(image_entry['file_name'])[0],
  }


def _group_by_image(data: dict, source: str) -> dict[int, list[dict]]:
  """Annotations per image id, in file order (checks their category ids)."""
  known = {int(c['id']) for c in data['categories']}
  per_image = collections.defaultdict(list)
  for ann in data['annotations']:
    if ann['category_id'] not in known:
      raise DatasetError(f'{source}: annotation {ann.get("id")} has '
                         f'category_id {ann["category_id"]}, not in the '
                         'file\'s categories.')
    per_image[ann['image_id']].append(ann)
  return per_image


@dataclasses.dataclass(eq=False)
class CocoConfig(tfds.core.BuilderConfig):
  """A COCO variant: the class set ('all' or 'non_voc')."""
  class_set: str = 'all'


class WsssCoco(tfds.core.GeneratorBasedBuilder):
  """MS-COCO instances in the wsss_jax example schema.

  The config name encodes the class set and the image folder names (e.g.
  `all_train2017_val2017`), never the root path: a prepared dataset opens
  without its raw files.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First version.'}

  def __init__(self, *, coco_config=None, **kwargs):
    self._coco = coco_config
    self.stats = prep.PrepStats()
    super().__init__(**kwargs)

  @property
  def class_set(self) -> str:
    return self.builder_config.class_set

  @property
  def num_foreground(self) -> int:
    return NUM_FOREGROUND[self.class_set]

  def _info(self) -> tfds.core.DatasetInfo:
    return prep.dataset_info(self, __doc__, self.num_foreground,
                             'https://cocodataset.org')

  def has_inputs(self) -> bool:
    return bool(self._coco is not None and self._coco.root)

  def describe_inputs(self) -> tuple[list[str], list[str]]:
    found, missing = resolve_paths(self._coco)
    lines = [f'coco ({self.class_set}): {split}: images {images}, '
             f'annotations {annotations}'
             for split, (images, annotations) in sorted(found.items())]
    return lines + missing, sorted(found)

  def summary_lines(self) -> list[str]:
    lines = []
    for split, c in sorted(self.info.metadata.get('counts', {}).items()):
      lines.append(
          f'{split}: {c.get("images_without_annotations", 0)} image(s) '
          f'without annotations, {c.get("images_without_boxes", 0)} without '
          f'a kept box (kept, all background); {c.get("crowd_regions", 0)} '
          f'crowd region(s) -> 255; {c.get("boxes_dropped", 0)} box(es) '
          'dropped')
    return lines

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    found, _ = resolve_paths(self._coco)
    self.stats = prep.PrepStats()
    metadata = self.info.metadata
    metadata.clear()
    metadata.update(skipped=self.stats.skipped, counts={},
                    class_set=self.class_set,
                    inputs={split: dict(images=images, annotations=annotations)
                            for split, (images, annotations) in found.items()})
    return {split: self._generate_examples(split=split, images_dir=images,
                                           annotations_path=annotations)
            for split, (images, annotations) in found.items()}

  def _generate_examples(self, split: str, images_dir: str,
                         annotations_path: str):
    # Loaded per split, inside the generator, so one JSON is in memory at once.
    data = load_annotations(annotations_path)
    id_map, class_names = category_table(data['categories'], self.class_set,
                                         annotations_path)
    self._record_classes(id_map, class_names, data['categories'],
                         annotations_path)
    per_image = _group_by_image(data, annotations_path)
    entries = sorted(data['images'], key=lambda e: e['id'])
    del data
    for entry in entries:
      image_id = os.path.splitext(entry['file_name'])[0]
      try:
        example = make_example(entry, per_image.get(entry['id'], []),
                               images_dir, id_map, self.num_foreground, split,
                               self.stats)
      except prep.BadFileError as e:
        self.stats.skip(split, image_id, e.path or os.path.join(
            images_dir, entry['file_name']), str(e))
        continue
      yield image_id, example
    self.info.metadata['counts'] = self.stats.counts_json()

  def _record_classes(self, id_map: dict[int, int], class_names: list[str],
                      categories: list[dict], source: str) -> None:
    """Writes class names and the category map; checks splits agree."""
    names = {int(c['id']): str(c['name']) for c in categories}
    category_map = {str(coco_id): dict(id=our_id, name=names[coco_id])
                    for coco_id, our_id in sorted(id_map.items())}
    metadata = self.info.metadata
    if 'category_map' in metadata and metadata['category_map'] != category_map:
      raise DatasetError(f'{source}: its categories differ from those of the '
                         'other split\'s annotation file.')
    metadata['class_names'] = class_names
    metadata['category_map'] = category_map


def config_name(coco_config) -> str:
  """The builder config name, e.g. `non_voc_train2017_val2017`.

  `<class_set>_<train image folder>_<val image folder>`: never the root path.
  """
  if coco_config.class_set not in NUM_FOREGROUND:
    raise DatasetError(
        f'config.data.coco.class_set={coco_config.class_set!r}; expected one '
        f'of {sorted(NUM_FOREGROUND)}.')
  folders = [os.path.basename(os.path.normpath(coco_config[f'{s}_images']))
             for s in _SPLITS]
  folders = [re.sub(r'[^A-Za-z0-9]+', '-', f) for f in folders]
  return '_'.join([coco_config.class_set] + folders)


def make_builder(data_config, data_dir: str) -> WsssCoco:
  """The COCO builder for `config.data` (`wsss_jax.defaults.coco_data()`)."""
  coco = data_config.coco.copy_and_resolve_references()
  if coco.root:
    coco.root = os.path.abspath(os.path.expanduser(coco.root))
  name = config_name(coco)
  config = CocoConfig(
      name=name, description=f'COCO instances, class set {coco.class_set}.',
      class_set=coco.class_set)
  return WsssCoco(coco_config=coco, data_dir=data_dir, config=config,
                  file_format='array_record')


def prepare(builder: WsssCoco, overwrite: bool = False) -> bool:
  """Prepares the dataset unless already prepared (prints a summary)."""
  return prep.prepare_builder(builder, overwrite=overwrite)
