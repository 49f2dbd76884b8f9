"""COCO builder on the real samples of tests/data/coco_mini (+ bad inputs)."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import shutil

import numpy as np
from PIL import Image
from pycocotools import coco as coco_api
from pycocotools import mask as mask_utils
import pytest

from wsss_jax import defaults
from wsss_jax.data import registry
from wsss_jax.data import schema
from wsss_jax.data.coco import builder as coco_builder
from wsss_jax.data.prepare import BadFileError

MINI = pathlib.Path(__file__).parent / 'data' / 'coco_mini'
TRAIN_JSON = MINI / 'annotations' / 'instances_train2017.json'
VOC_IDS = {1, 2, 3, 4, 5, 6, 7, 9, 16, 17, 18, 19, 20, 21, 44, 62, 63, 64, 67,
           72}


def _build(out_dir, root, class_set='all'):
  config = defaults.coco_data(class_set)
  config.coco.root = str(root)
  builder = coco_builder.make_builder(config, str(out_dir))
  coco_builder.prepare(builder)
  return registry.Dataset('coco', builder)


def _examples(dataset, split):
  source = dataset.source(split)
  return {ex[schema.IMAGE_ID]: ex for ex in (source[i]
                                             for i in range(len(source)))}


@pytest.fixture(scope='module')
def api():
  with contextlib.redirect_stdout(io.StringIO()):
    return coco_api.COCO(str(TRAIN_JSON))


@pytest.fixture(scope='module')
def full(tmp_path_factory):
  return _build(tmp_path_factory.mktemp('coco_all'), MINI, 'all')


@pytest.fixture(scope='module')
def non_voc(tmp_path_factory):
  return _build(tmp_path_factory.mktemp('coco_60'), MINI, 'non_voc')


def _reference_mask(api, image_id, id_map):
  """Independent painter: crowd -> 255, then instances largest area first."""
  info = api.imgs[image_id]
  out = np.zeros((info['height'], info['width']), np.uint8)
  anns = [a for a in api.imgToAnns[image_id] if a['category_id'] in id_map]
  for ann in anns:
    if ann['iscrowd']:
      out[api.annToMask(ann) > 0] = 255
  instances = [(i, a) for i, a in enumerate(anns) if not a['iscrowd']]
  areas = {i: int(api.annToMask(a).sum()) for i, a in instances}
  for i, ann in sorted(instances, key=lambda t: (-areas[t[0]], t[0])):
    out[api.annToMask(ann) > 0] = id_map[ann['category_id']]
  return out


def test_all_classes_and_category_map(full):
  assert set(full.splits) == {'train', 'val'}
  assert len(full.index('train')) == 32 and len(full.index('val')) == 6
  assert len(full.class_names) == 81
  assert full.class_names[:3] == ('background', 'person', 'bicycle')
  category_map = full.metadata['category_map']
  # Ascending COCO ids -> 1..80: bottle (44) is the 40th category.
  assert category_map['44'] == {'id': 40, 'name': 'bottle'}
  assert category_map['90'] == {'id': 80, 'name': 'toothbrush'}
  assert full.skipped == []


def test_prepared_dataset_opens_without_root(full):
  config = defaults.coco_data('all')   # root left empty
  config.data_dir = str(pathlib.Path(full.builder.data_dir).parents[2])
  dataset = registry.open_dataset(config, prepare=False)
  assert dataset.class_names == full.class_names
  assert len(dataset.index('train')) == 32


def test_known_image_and_box(full, api):
  ex = _examples(full, 'train')['000000397133']
  assert ex[schema.IMAGE].shape == (427, 640, 3)
  # Annotation 82445, bbox [217.62, 240.54, 38.99, 57.75] ->
  # [floor(x), floor(y), ceil(x + w), ceil(y + h)].
  assert [217, 240, 257, 299] in ex[schema.BOXES].tolist()
  row = ex[schema.BOXES].tolist().index([217, 240, 257, 299])
  assert ex[schema.BOX_LABELS][row] == 40
  non_crowd = [a for a in api.imgToAnns[397133] if not a['iscrowd']]
  assert len(ex[schema.BOXES]) == len(non_crowd) == 19
  assert ex[schema.IMAGE_LABELS].sum() == len(set(
      a['category_id'] for a in non_crowd))


def test_masks_match_reference_painter(full, api):
  id_map = {int(k): v['id'] for k, v in full.metadata['category_map'].items()}
  examples = _examples(full, 'train')
  for image_id, info in api.imgs.items():
    ex = examples[info['file_name'][:-4]]
    np.testing.assert_array_equal(ex[schema.MASK],
                                  _reference_mask(api, image_id, id_map))


def test_crowd_rle_is_ignore(full, api):
  crowd = next(a for a in api.anns.values()
               if a['iscrowd'] and a['image_id'] == 386912)
  assert isinstance(crowd['segmentation']['counts'], list)   # RLE
  ex = _examples(full, 'train')['000000386912']
  region = api.annToMask(crowd) > 0
  others = np.zeros_like(region)
  for ann in api.imgToAnns[386912]:
    if not ann['iscrowd']:
      others |= api.annToMask(ann) > 0
  only_crowd = region & ~others
  assert only_crowd.sum() > 1000
  assert (ex[schema.MASK][only_crowd] == 255).all()
  assert (ex[schema.MASK][others] != 255).all()
  # The crowd annotation gives no box.
  assert len(ex[schema.BOXES]) == sum(
      not a['iscrowd'] for a in api.imgToAnns[386912])


def test_images_without_annotations_are_kept(full):
  examples = _examples(full, 'train')
  for image_id in ('000000226111', '000000058636'):
    ex = examples[image_id]
    assert not ex[schema.MASK].any()
    assert ex[schema.BOXES].shape == (0, 4)
    assert not ex[schema.IMAGE_LABELS].any()
  assert full.metadata['counts']['train']['images_without_annotations'] == 2


def test_non_voc_filter(non_voc, api):
  assert len(non_voc.class_names) == 61
  category_map = non_voc.metadata['category_map']
  assert not VOC_IDS & {int(k) for k in category_map}
  assert [v['id'] for v in category_map.values()] == list(range(1, 61))
  # COCO ids 1..7 are VOC classes; truck (8) is the first kept, boat (9) is
  # VOC, traffic light (10) the second.
  assert category_map['8'] == {'id': 1, 'name': 'truck'}
  assert category_map['10'] == {'id': 2, 'name': 'traffic light'}
  names = set(non_voc.class_names)
  assert not {'person', 'bottle', 'car', 'dining table'} & names
  id_map = {int(k): v['id'] for k, v in category_map.items()}
  examples = _examples(non_voc, 'train')
  for image_id, info in api.imgs.items():
    ex = examples[info['file_name'][:-4]]
    kept = [a for a in api.imgToAnns[image_id]
            if a['category_id'] not in VOC_IDS and not a['iscrowd']]
    assert len(ex[schema.BOXES]) == len(kept)
    assert ex[schema.BOX_LABELS].max(initial=0) <= 60
    np.testing.assert_array_equal(ex[schema.MASK],
                                  _reference_mask(api, image_id, id_map))
  # 397133: the bottle (VOC) is gone; its pixels are background.
  ex = examples['000000397133']
  bottle = api.annToMask(api.anns[82445]) > 0
  assert [217, 240, 257, 299] not in ex[schema.BOXES].tolist()
  assert (ex[schema.MASK][bottle] == 0).mean() > 0.9
  # Person crowds (VOC class) are background too; the book crowd stays 255.
  person_crowd = api.annToMask(api.anns[900100296649]) > 0
  assert (examples['000000296649'][schema.MASK][person_crowd] != 255).all()
  assert 255 in examples['000000386912'][schema.MASK]


def test_edge_box_and_rle_forms():
  assert coco_builder.edge_box([217.62, 240.54, 38.99, 57.75]) == (
      217, 240, 257, 299)
  assert coco_builder.edge_box([3, 4, 5, 6]) == (3, 4, 8, 10)
  target = np.zeros((5, 6), np.uint8, order='F')
  target[1:3, 2:5] = 1
  compressed = mask_utils.encode(target)
  as_text = {'size': [5, 6], 'counts': compressed['counts'].decode('ascii')}
  rle = coco_builder.annotation_rle(as_text, 5, 6)
  np.testing.assert_array_equal(mask_utils.decode(rle), target)
  # Polygon of the same rectangle (pixel-edge coordinates).
  rle = coco_builder.annotation_rle([[2, 1, 5, 1, 5, 3, 2, 3], [0, 0]], 5, 6)
  np.testing.assert_array_equal(mask_utils.decode(rle), target)
  assert coco_builder.annotation_rle([[1, 2, 3, 4]], 5, 6) is None
  with pytest.raises(BadFileError, match='RLE size'):
    coco_builder.annotation_rle({'size': [4, 6], 'counts': [24]}, 5, 6)


def test_paint_mask_order():
  masks = np.zeros((3, 4, 4), bool)
  masks[0, :, :] = True           # large object, class 1
  masks[1, 1:3, 1:3] = True       # small object, class 2
  masks[2, 0:2, 0:2] = True       # crowd, class 3
  out = coco_builder.paint_mask(masks[[1, 0, 2]], np.array([2, 1, 3]),
                                np.array([False, False, True]))
  expected = np.ones((4, 4), np.uint8)
  expected[1:3, 1:3] = 2          # the smaller object stays on top
  np.testing.assert_array_equal(out, expected)   # instances cover the crowd
  only_crowd = coco_builder.paint_mask(masks[2:], np.array([3]),
                                       np.array([True]))
  assert (only_crowd[0:2, 0:2] == 255).all() and only_crowd.sum() == 4 * 255


def test_category_table_errors():
  categories = [{'id': i, 'name': f'c{i}'} for i in range(1, 81)]
  id_map, names = coco_builder.category_table(categories, 'non_voc', 'x.json')
  assert len(id_map) == 60 and names[1] == 'c8' and id_map[80] == 60
  with pytest.raises(registry.DatasetError, match='x.json.*found 79'):
    coco_builder.category_table(categories[:-1], 'all', 'x.json')
  with pytest.raises(registry.DatasetError, match='class_set'):
    coco_builder.category_table(categories, 'voc', 'x.json')


# ----------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------
def _tree(root: pathlib.Path, with_val=True) -> pathlib.Path:
  shutil.copytree(MINI / 'images' / 'train2017', root / 'train2017')
  (root / 'annotations').mkdir(parents=True)
  shutil.copy(TRAIN_JSON, root / 'annotations')
  if with_val:
    shutil.copytree(MINI / 'images' / 'val2017', root / 'val2017')
    shutil.copy(MINI / 'annotations' / 'instances_val2017.json',
                root / 'annotations')
  return root


def test_missing_root_and_split(tmp_path, capsys):
  with pytest.raises(registry.DatasetError, match=str(tmp_path / 'nowhere')):
    _build(tmp_path / 'out', tmp_path / 'nowhere')
  with pytest.raises(registry.DatasetError, match='root is empty'):
    coco_builder.prepare(coco_builder.make_builder(defaults.coco_data(),
                                                   str(tmp_path / 'o')))
  root = _tree(tmp_path / 'coco', with_val=False)   # official flat layout
  dataset = _build(tmp_path / 'out', root)
  assert dataset.splits == ('train',)
  assert 'val: skipped, missing' in capsys.readouterr().out


def test_corrupt_and_mismatched_images_are_skipped(tmp_path):
  root = _tree(tmp_path / 'coco', with_val=False)
  jpeg = root / 'train2017' / '000000397133.jpg'
  jpeg.write_bytes(jpeg.read_bytes()[:5000])
  data = json.loads(TRAIN_JSON.read_text())
  entry = next(i for i in data['images'] if i['id'] == 6818)
  entry['width'] += 1
  (root / 'annotations' / 'instances_train2017.json').write_text(
      json.dumps(data))
  dataset = _build(tmp_path / 'out', root)
  assert len(dataset.index('train')) == 30
  skipped = {s['image_id']: s['reason'] for s in dataset.skipped}
  assert 'corrupt image' in skipped['000000397133']
  assert 'JSON size' in skipped['000000006818']


def test_unknown_category_is_an_error(tmp_path):
  root = _tree(tmp_path / 'coco', with_val=False)
  data = json.loads(TRAIN_JSON.read_text())
  data['annotations'][0]['category_id'] = 12   # not a COCO category
  (root / 'annotations' / 'instances_train2017.json').write_text(
      json.dumps(data))
  with pytest.raises(registry.DatasetError, match='category_id 12'):
    _build(tmp_path / 'out', root)


def test_grayscale_image_decodes_to_three_channels(tmp_path):
  root = _tree(tmp_path / 'coco', with_val=False)
  path = root / 'train2017' / '000000397133.jpg'
  with Image.open(path) as image:
    image.convert('L').save(path, quality=90)
  dataset = _build(tmp_path / 'out', root)
  image = _examples(dataset, 'train')['000000397133'][schema.IMAGE]
  assert image.shape == (427, 640, 3)
  assert (image[..., 0] == image[..., 1]).all()
  assert dataset.metadata['counts']['train'].get('images_reencoded', 0) == 0
