"""VOC 2012 (+ SBD) builder on the real samples of tests/data/voc_mini and on
small trees built in tmp dirs (SBD .mat, SegmentationClassAug, bad inputs)."""

from __future__ import annotations

import io
import pathlib
import shutil

import numpy as np
from PIL import Image
import pytest
import scipy.io
import scipy.sparse
import tensorflow_datasets as tfds

from wsss_jax import defaults
from wsss_jax.data import registry
from wsss_jax.data import schema
from wsss_jax.data.prepare import BadFileError
from wsss_jax.data.voc import builder as voc_builder
from wsss_jax.data.voc import parse

MINI = pathlib.Path(__file__).parent / 'data' / 'voc_mini'
C = {name: i for i, name in enumerate(schema.VOC_CLASSES)}

# From voc_mini/README.md: id -> (width, height, classes in the mask).
README = {
    '2007_000032': (500, 281, {'aeroplane', 'person'}),
    '2007_000033': (500, 366, {'aeroplane'}),
    '2007_000039': (500, 375, {'tvmonitor'}),
    '2007_000042': (500, 335, {'train'}),
    '2007_000063': (500, 375, {'chair', 'dog'}),
    '2007_000243': (500, 333, {'aeroplane'}),
    '2007_000256': (500, 343, {'aeroplane'}),
    '2007_000333': (500, 333, {'train'}),
    '2007_000648': (500, 333, {'aeroplane', 'bus', 'car', 'person'}),
    '2007_000676': (500, 375, {'sheep'}),
    '2007_000713': (500, 336, {'boat'}),
    '2007_000733': (450, 435, {'motorbike', 'person'}),
    '2007_000738': (500, 332, {'aeroplane'}),
    '2007_001185': (500, 375, {'bottle', 'cat', 'diningtable', 'person'}),
    '2011_000003': (500, 338, {'bottle', 'person'}),
    '2011_000006': (500, 375, {'chair', 'person', 'sofa'}),
    '2011_000025': (500, 375, {'bus', 'car'}),
}
VAL = {'2007_000033', '2007_000042', '2007_000676'}
XML_IDS = {'2007_000032', '2007_000033', '2007_000039', '2007_000042',
           '2007_000243'}


def _build(out_dir, voc_root, sbd_root='', seg_aug_root=''):
  config = defaults.voc_data()
  config.voc.voc_root = str(voc_root)
  config.voc.sbd_root = str(sbd_root)
  config.voc.seg_aug_root = str(seg_aug_root)
  builder = voc_builder.make_builder(config, str(out_dir))
  voc_builder.prepare(builder)
  return registry.Dataset('voc', builder)


def _examples(dataset, split):
  source = dataset.source(split)
  return {ex[schema.IMAGE_ID]: ex for ex in (source[i]
                                             for i in range(len(source)))}


def _tree(root: pathlib.Path, train, val, xml=True) -> pathlib.Path:
  """A VOC2012 tree with copies of voc_mini files for the given ids."""
  for sub in ('JPEGImages', 'SegmentationClass', 'Annotations',
              'ImageSets/Segmentation'):
    (root / sub).mkdir(parents=True, exist_ok=True)
  for image_id in list(train) + list(val):
    shutil.copy(MINI / 'JPEGImages' / f'{image_id}.jpg', root / 'JPEGImages')
    shutil.copy(MINI / 'SegmentationClass' / f'{image_id}.png',
                root / 'SegmentationClass')
    if xml and (MINI / 'Annotations' / f'{image_id}.xml').exists():
      shutil.copy(MINI / 'Annotations' / f'{image_id}.xml',
                  root / 'Annotations')
  lists = root / 'ImageSets' / 'Segmentation'
  (lists / 'train.txt').write_text(''.join(f'{i}\n' for i in train))
  (lists / 'val.txt').write_text(''.join(f'{i}\n' for i in val))
  return root


def _xml(objects, width=500, height=375) -> str:
  body = ''.join(
      f'<object><name>{name}</name><difficult>1</difficult><bndbox>'
      f'<xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>'
      f'<ymax>{b[3]}</ymax></bndbox></object>' for name, b in objects)
  return (f'<annotation><size><width>{width}</width><height>{height}</height>'
          f'</size>{body}</annotation>')


# ----------------------------------------------------------------------------
# The real samples
# ----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def mini(tmp_path_factory):
  return _build(tmp_path_factory.mktemp('voc_out'), MINI)


def test_mini_splits_and_classes(mini):
  assert mini.class_names == schema.VOC_CLASSES
  assert set(mini.splits) == {'train', 'val'}   # no SBD: no train_aug
  assert set(mini.index('train').image_ids) == set(README) - VAL
  assert set(mini.index('val').image_ids) == VAL
  assert mini.skipped == []


def test_mini_sizes_labels_and_masks(mini):
  for split in ('train', 'val'):
    for image_id, ex in _examples(mini, split).items():
      width, height, classes = README[image_id]
      assert ex[schema.IMAGE].shape == (height, width, 3)
      assert ex[schema.IMAGE].dtype == np.uint8
      expected_mask = np.array(
          Image.open(MINI / 'SegmentationClass' / f'{image_id}.png'))
      np.testing.assert_array_equal(ex[schema.MASK], expected_mask)
      expected = np.zeros(20, bool)
      expected[[C[c] - 1 for c in classes]] = True
      np.testing.assert_array_equal(ex[schema.IMAGE_LABELS], expected)
      assert set(ex[schema.BOX_LABELS].tolist()) == {C[c] for c in classes}


def test_mini_stores_original_jpeg_bytes(mini):
  source = mini.builder.as_data_source(
      'val', decoders={schema.IMAGE: tfds.decode.SkipDecoding()})
  for i in range(len(source)):
    record = source[i]
    image_id = record[schema.IMAGE_ID]
    image_id = image_id.decode() if isinstance(image_id, bytes) else image_id
    assert record[schema.IMAGE] == (MINI / 'JPEGImages'
                                    / f'{image_id}.jpg').read_bytes()


def test_mini_xml_boxes_are_edge_boxes(mini):
  ex = _examples(mini, 'train')['2007_000032']
  # XML (1-based inclusive) 104,78,375,183 -> x0 = xmin - 1, x1 = xmax.
  np.testing.assert_array_equal(ex[schema.BOXES], [
      [103, 77, 375, 183], [132, 87, 197, 123],
      [194, 179, 213, 229], [25, 188, 44, 238]])
  np.testing.assert_array_equal(ex[schema.BOX_LABELS], [1, 1, 15, 15])
  ex = _examples(mini, 'val')['2007_000042']
  np.testing.assert_array_equal(ex[schema.BOXES],
                                [[262, 31, 500, 295], [0, 35, 235, 299]])


def test_mini_boxes_from_masks_without_xml(mini):
  counts = mini.metadata['box_source_counts']
  assert (counts['train']['xml'], counts['train']['mask_components']) == (3, 11)
  assert (counts['val']['xml'], counts['val']['mask_components']) == (2, 1)
  ex = _examples(mini, 'train')['2007_000063']
  mask, boxes, labels = ex[schema.MASK], ex[schema.BOXES], ex[schema.BOX_LABELS]
  for class_id in (C['chair'], C['dog']):
    rows, cols = np.nonzero(mask == class_id)
    mine = boxes[labels == class_id]
    # The union of the class's component boxes is the class's extent.
    assert (mine[:, 0].min(), mine[:, 1].min()) == (cols.min(), rows.min())
    assert (mine[:, 2].max(), mine[:, 3].max()) == (cols.max() + 1,
                                                    rows.max() + 1)


def test_prepare_is_idempotent(mini, capsys):
  assert voc_builder.prepare(mini.builder) is False
  assert 'already prepared' in capsys.readouterr().out


def test_prepared_dataset_opens_without_raw_roots(mini):
  config = defaults.voc_data()     # voc_root left empty
  config.data_dir = str(pathlib.Path(mini.builder.data_dir).parents[2])
  dataset = registry.open_dataset(config, prepare=False)
  assert dataset.index('val').image_ids == mini.index('val').image_ids
  assert dataset.metadata['box_source_counts'] == (
      mini.metadata['box_source_counts'])


# ----------------------------------------------------------------------------
# SBD and SegmentationClassAug
# ----------------------------------------------------------------------------
def _sbd_mask(height=343, width=500):
  seg = np.zeros((height, width), np.uint8)
  seg[20:120, 30:200] = C['aeroplane']
  seg[150:300, 250:400] = C['person']
  inst = np.zeros_like(seg)
  inst[20:120, 30:200] = 1
  inst[150:300, 250:300] = 2
  inst[150:300, 300:400] = 3
  return seg, inst


def _save_sbd(sbd, image_id, seg, inst=None):
  boundaries = np.empty((20, 1), object)
  for k in range(20):
    boundaries[k, 0] = scipy.sparse.csc_matrix(seg.shape, dtype=np.uint8)
  scipy.io.savemat(sbd / 'cls' / f'{image_id}.mat', {'GTcls': {
      'Segmentation': seg, 'Boundaries': boundaries,
      'CategoriesPresent': np.unique(seg[seg > 0]).reshape(-1, 1)}})
  if inst is not None:
    scipy.io.savemat(sbd / 'inst' / f'{image_id}.mat', {'GTinst': {
        'Segmentation': inst, 'Boundaries': boundaries[:3],
        'Categories': np.array([[1], [15], [15]], np.uint8)}})


def test_sbd_mat_layout(tmp_path):
  (tmp_path / 'cls').mkdir()
  (tmp_path / 'inst').mkdir()
  seg, inst = _sbd_mask(7, 9)
  _save_sbd(tmp_path, 'x', seg, inst)
  np.testing.assert_array_equal(parse.read_sbd_class_mat(
      str(tmp_path / 'cls' / 'x.mat')), seg)
  np.testing.assert_array_equal(parse.read_sbd_instance_mat(
      str(tmp_path / 'inst' / 'x.mat')), inst)
  scipy.io.savemat(tmp_path / 'bad.mat', {'other': np.zeros(3)})
  with pytest.raises(BadFileError, match='GTcls'):
    parse.read_sbd_class_mat(str(tmp_path / 'bad.mat'))


def test_train_aug_from_sbd(tmp_path):
  voc = _tree(tmp_path / 'VOC2012', ['2007_000032', '2007_000063'],
              ['2007_000033'])
  sbd = tmp_path / 'sbd'
  (sbd / 'cls').mkdir(parents=True)
  (sbd / 'inst').mkdir()
  seg, inst = _sbd_mask()
  shutil.copy(MINI / 'JPEGImages' / '2007_000256.jpg',
              voc / 'JPEGImages' / '2008_000001.jpg')
  (sbd / 'img').mkdir()   # An image only SBD has.
  shutil.copy(MINI / 'JPEGImages' / '2007_000256.jpg',
              sbd / 'img' / '2008_000002.jpg')
  _save_sbd(sbd, '2008_000001', seg, inst)
  _save_sbd(sbd, '2008_000002', seg)
  # 2007_000033 is VOC val: it must stay out of train_aug.
  (sbd / 'train.txt').write_text('2008_000001\n2007_000033\n')
  (sbd / 'val.txt').write_text('2008_000002\n')
  dataset = _build(tmp_path / 'out', voc, sbd_root=sbd)
  assert dataset.index('train_aug').image_ids == (
      '2007_000032', '2007_000063', '2008_000001', '2008_000002')
  examples = _examples(dataset, 'train_aug')
  ex = examples['2008_000001']
  np.testing.assert_array_equal(ex[schema.MASK], seg)
  np.testing.assert_array_equal(ex[schema.BOXES], [
      [30, 20, 200, 120], [250, 150, 300, 300], [300, 150, 400, 300]])
  np.testing.assert_array_equal(ex[schema.BOX_LABELS], [1, 15, 15])
  # Without an instance file: one box per connected component of each class.
  ex = examples['2008_000002']
  np.testing.assert_array_equal(ex[schema.BOXES],
                                [[30, 20, 200, 120], [250, 150, 400, 300]])
  counts = dataset.metadata['box_source_counts']['train_aug']
  assert counts == {'xml': 1, 'segmentation_object': 0, 'sbd_inst': 1,
                    'mask_components': 2}
  # VOC ids keep the official VOC mask (with its 255 band).
  assert 255 in examples['2007_000032'][schema.MASK]


def test_train_aug_from_seg_aug_folder_and_list(tmp_path):
  voc = _tree(tmp_path / 'VOC2012', ['2007_000032'], ['2007_000033'])
  aug = tmp_path / 'SegmentationClassAug'
  aug.mkdir()
  seg, _ = _sbd_mask()
  Image.fromarray(seg, 'L').save(aug / '2008_000001.png')
  shutil.copy(MINI / 'SegmentationClass' / '2007_000033.png', aug)
  shutil.copy(MINI / 'JPEGImages' / '2007_000256.jpg',
              voc / 'JPEGImages' / '2008_000001.jpg')
  dataset = _build(tmp_path / 'out', voc, seg_aug_root=aug)
  assert dataset.index('train_aug').image_ids == ('2007_000032', '2008_000001')
  np.testing.assert_array_equal(
      _examples(dataset, 'train_aug')['2008_000001'][schema.MASK], seg)
  # An explicit train_aug.txt (two-column DeepLab format) wins.
  (voc / 'ImageSets/Segmentation/train_aug.txt').write_text(
      '/JPEGImages/2008_000001.jpg /SegmentationClassAug/2008_000001.png\n')
  dataset = _build(tmp_path / 'out2', voc, seg_aug_root=aug)
  assert dataset.index('train_aug').image_ids == ('2008_000001',)


# ----------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------
def test_missing_root_and_lists(tmp_path):
  with pytest.raises(registry.DatasetError, match=str(tmp_path / 'nowhere')):
    _build(tmp_path / 'out', tmp_path / 'nowhere')
  config = defaults.voc_data()
  with pytest.raises(registry.DatasetError, match='voc_root is empty'):
    voc_builder.prepare(voc_builder.make_builder(config, str(tmp_path / 'o')))
  voc = _tree(tmp_path / 'VOC2012', ['2007_000032'], ['2007_000033'])
  (voc / 'ImageSets/Segmentation/val.txt').unlink()
  with pytest.raises(registry.DatasetError, match='val.txt does not exist'):
    _build(tmp_path / 'out', voc)
  with pytest.raises(registry.DatasetError, match='sbd_missing'):
    _build(tmp_path / 'out', voc, sbd_root=tmp_path / 'sbd_missing')


def test_unknown_class_name_is_an_error(tmp_path):
  voc = _tree(tmp_path / 'VOC2012', ['2007_000063'], ['2007_000033'])
  xml = voc / 'Annotations' / '2007_000063.xml'
  xml.write_text(_xml([('chair', (1, 1, 9, 9)), ('aeroplan', (5, 5, 20, 20))]))
  with pytest.raises(registry.DatasetError,
                     match=r"2007_000063.xml.*'aeroplan'"):
    _build(tmp_path / 'out', voc)


def test_corrupt_image_and_size_mismatch_are_skipped(tmp_path):
  voc = _tree(tmp_path / 'VOC2012', ['2007_000032', '2007_000063',
                                     '2007_000256'], ['2007_000033'])
  jpeg = voc / 'JPEGImages' / '2007_000063.jpg'
  jpeg.write_bytes(jpeg.read_bytes()[:len(jpeg.read_bytes()) // 2])
  png = voc / 'SegmentationClass' / '2007_000256.png'
  Image.open(png).crop((0, 0, 400, 343)).save(png)
  dataset = _build(tmp_path / 'out', voc)
  assert dataset.index('train').image_ids == ('2007_000032',)
  skipped = {s['image_id']: s for s in dataset.skipped}
  assert set(skipped) == {'2007_000063', '2007_000256'}
  assert 'corrupt image' in skipped['2007_000063']['reason']
  assert skipped['2007_000063']['split'] == 'train'
  assert skipped['2007_000063']['file'].endswith('2007_000063.jpg')
  assert skipped['2007_000256']['reason'] == (
      'mask size 400x343 != image size 500x343')
  assert skipped['2007_000256']['file'].endswith(
      'SegmentationClass/2007_000256.png')


def test_boxes_clipped_and_empty_boxes_dropped(tmp_path):
  voc = _tree(tmp_path / 'VOC2012', ['2007_000063'], ['2007_000033'])
  (voc / 'Annotations' / '2007_000063.xml').write_text(_xml([
      ('dog', (100, 50, 600, 200)),      # past the right edge: clipped
      ('chair', (10, 10, 9, 30)),        # xmax < xmin: no pixel, dropped
      ('chair', (501, 10, 520, 30)),     # outside the image: dropped
      ('chair', (1, 1, 1, 1)),           # one pixel: kept
  ]))
  dataset = _build(tmp_path / 'out', voc)
  ex = _examples(dataset, 'train')['2007_000063']
  np.testing.assert_array_equal(ex[schema.BOXES],
                                [[99, 49, 500, 200], [0, 0, 1, 1]])
  np.testing.assert_array_equal(ex[schema.BOX_LABELS], [C['dog'], C['chair']])
  counts = dataset.metadata['counts']['train']
  assert counts['boxes_clipped'] == 1 and counts['boxes_dropped'] == 2


def test_segmentation_object_gives_instance_boxes(tmp_path):
  voc = _tree(tmp_path / 'VOC2012', ['2007_000063'], ['2007_000033'])
  mask = np.array(Image.open(voc / 'SegmentationClass' / '2007_000063.png'))
  instances = np.where(mask == C['chair'], 1, 0) + np.where(mask == C['dog'],
                                                            2, 0)
  instances[mask == 255] = 255
  (voc / 'SegmentationObject').mkdir()
  palette_png = Image.fromarray(instances.astype(np.uint8), 'P')
  palette_png.putpalette(schema.voc_palette().reshape(-1).tolist())
  palette_png.save(voc / 'SegmentationObject' / '2007_000063.png')
  dataset = _build(tmp_path / 'out', voc)
  ex = _examples(dataset, 'train')['2007_000063']
  for box, label in zip(ex[schema.BOXES], ex[schema.BOX_LABELS]):
    rows, cols = np.nonzero(mask == label)
    assert tuple(box) == (cols.min(), rows.min(), cols.max() + 1,
                          rows.max() + 1)
  assert sorted(ex[schema.BOX_LABELS].tolist()) == [C['chair'], C['dog']]
  assert dataset.metadata['box_source_counts']['train'][
      'segmentation_object'] == 1


# ----------------------------------------------------------------------------
# Parsers
# ----------------------------------------------------------------------------
def test_parse_xml_ignores_parts_and_rounds(tmp_path):
  path = tmp_path / 'a.xml'
  path.write_text(
      '<annotation><object><name> person </name><bndbox><xmin>10.4</xmin>'
      '<ymin>20</ymin><xmax>30.6</xmax><ymax>40</ymax></bndbox><part>'
      '<name>head</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax>'
      '<ymax>2</ymax></bndbox></part></object></annotation>')
  boxes, labels = parse.parse_voc_xml(str(path))
  np.testing.assert_array_equal(boxes, [[9, 19, 31, 40]])
  np.testing.assert_array_equal(labels, [C['person']])
  path.write_text('<annotation><object><name>cat</name></object>')
  with pytest.raises(BadFileError, match='unreadable XML'):
    parse.parse_voc_xml(str(path))
  path.write_text('<annotation><object><name>cat</name></object></annotation>')
  with pytest.raises(BadFileError, match='bndbox'):
    parse.parse_voc_xml(str(path))


def test_mask_values_and_modes(tmp_path):
  parse.check_mask_values(np.array([0, 20, 255], np.uint8))
  with pytest.raises(BadFileError, match=r'\[21, 254\]'):
    parse.check_mask_values(np.array([0, 21, 254], np.uint8))
  Image.new('RGB', (4, 3)).save(tmp_path / 'rgb.png')
  with pytest.raises(BadFileError, match="mode 'RGB'"):
    voc_builder.read_mask(str(tmp_path / 'rgb.png'))
  buffer = io.BytesIO()
  Image.new('L', (4, 3)).save(buffer, format='PNG')
  (tmp_path / 'trunc.png').write_bytes(buffer.getvalue()[:20])
  with pytest.raises(BadFileError, match='corrupt mask'):
    voc_builder.read_mask(str(tmp_path / 'trunc.png'))


def test_split_with_no_usable_example_is_an_error(tmp_path):
  voc = _tree(tmp_path / 'VOC2012', ['2007_000032'], ['2007_000033'])
  (voc / 'JPEGImages' / '2007_000033.jpg').write_bytes(b'not a jpeg')
  with pytest.raises(registry.DatasetError,
                     match=r"no usable example.*2007_000033"):
    _build(tmp_path / 'out', voc)
  assert not (tmp_path / 'out' / 'wsss_voc' / 'voc2012' / '1.0.0').exists()
