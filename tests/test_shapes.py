"""Tests of the embedded "shapes" benchmark (renderer, builder, registry)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from wsss_jax import defaults
from wsss_jax.data import boxes as box_lib
from wsss_jax.data import registry
from wsss_jax.data import schema
from wsss_jax.data.shapes import builder
from wsss_jax.data.shapes import encode
from wsss_jax.data.shapes import geometry
from wsss_jax.data.shapes import render


def _scene(index: int, size: int = 64, family: str = 'main', seed: int = 0,
           num_classes: int = 6, min_objects: int = 1,
           max_objects: int = 4) -> render.Scene:
  rng = render.example_rng(seed, family, 'train', index)
  return render.render_scene(rng, size, num_classes, min_objects, max_objects,
                             family)


def _scenes(family: str = 'main', count: int = 12, **kwargs):
  return [_scene(i, family=family, **kwargs) for i in range(count)]


# ----------------------------------------------------------------------------
# Renderer
# ----------------------------------------------------------------------------
def test_class_names():
  assert render.class_names('main', 6) == (
      'background', 'ellipse', 'triangle', 'star', 'ring', 'cross',
      'crescent')
  assert render.class_names('aux', 2) == ('background', 'polygon', 'heart')
  with pytest.raises(ValueError, match='num_classes'):
    render.class_names('main', 7)
  with pytest.raises(ValueError, match='family'):
    render.class_names('other', 3)


@pytest.mark.parametrize('other', ['aux', 'pretrain'])
def test_aux_and_pretrain_families_share_no_shape_or_texture(other):
  """The auxiliary (LPG) and pretraining classes are disjoint from the
  target classes and from each other, in shape and in texture."""
  textures = {f: {render._STYLE[s][1] for s in render.SHAPES[f]}
              for f in render.FAMILIES}
  for family in ('main', 'aux', 'pretrain'):
    if family == other:
      continue
    assert len(render.SHAPES[other]) == len(render.SHAPES[family]) == 6
    assert not set(render.SHAPES[family]) & set(render.SHAPES[other])
    assert len(textures[family]) == len(textures[other]) == 6
    assert not textures[family] & textures[other]


def test_same_seed_same_arrays_different_seed_different():
  first = render.render_example(np.random.default_rng([3, 0, 5]), 48, 6, 1, 4)
  again = render.render_example(np.random.default_rng([3, 0, 5]), 48, 6, 1, 4)
  other = render.render_example(np.random.default_rng([4, 0, 5]), 48, 6, 1, 4)
  assert first.keys() == again.keys()
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
  assert not np.array_equal(first[schema.IMAGE], other[schema.IMAGE])


def test_example_rng_separates_splits_and_families():
  draws = {(f, s): render.example_rng(0, f, s, 7).integers(1 << 62)
           for f in render.FAMILIES for s in render.SPLITS}
  assert len(set(draws.values())) == len(render.FAMILIES) * len(render.SPLITS)
  with pytest.raises(ValueError, match='split'):
    render.example_rng(0, 'main', 'test', 0)


@pytest.mark.parametrize('family', render.FAMILIES)
def test_schema_dtypes_and_shapes(family):
  for index in range(6):
    example = render.render_example(
        render.example_rng(1, family, 'val', index), 40, 4, 1, 4, family)
    assert set(example) == {schema.IMAGE, schema.MASK, schema.BOXES,
                            schema.BOX_LABELS, schema.IMAGE_LABELS}
    assert example[schema.IMAGE].dtype == np.uint8
    assert example[schema.IMAGE].shape == (40, 40, 3)
    assert example[schema.MASK].dtype == np.uint8
    assert example[schema.MASK].shape == (40, 40)
    boxes, labels = example[schema.BOXES], example[schema.BOX_LABELS]
    assert boxes.dtype == np.int32 and boxes.ndim == 2
    assert boxes.shape[1] == 4
    assert labels.dtype == np.int32 and labels.shape == (len(boxes),)
    assert 1 <= len(boxes) <= 4
    assert np.all((labels >= 1) & (labels <= 4))
    assert example[schema.IMAGE_LABELS].dtype == bool
    assert example[schema.IMAGE_LABELS].shape == (4,)
    values = set(np.unique(example[schema.MASK]).tolist())
    assert values <= set(range(5)) | {schema.IGNORE_LABEL}


@pytest.mark.parametrize('family', render.FAMILIES)
def test_boxes_are_the_visible_extent_of_each_instance(family):
  for scene in _scenes(family):
    height, width = scene.mask.shape
    assert scene.instances.max() == len(scene.boxes)
    for index, box in enumerate(scene.boxes, start=1):
      rows, cols = np.nonzero(scene.instances == index)
      expected = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
      np.testing.assert_array_equal(box, expected)
    # Every labelled foreground pixel lies in a box of its own class.
    cover = box_lib.box_coverage(scene.boxes, height, width)
    for class_id in np.unique(scene.mask):
      if class_id in (0, schema.IGNORE_LABEL):
        continue
      own = cover[scene.box_labels == class_id].any(axis=0)
      assert np.all(own[scene.mask == class_id])


@pytest.mark.parametrize('family', render.FAMILIES)
def test_labels_agree_with_boxes_and_mask(family):
  for scene in _scenes(family):
    from_boxes = schema.image_labels_from_ids(scene.box_labels, 6)
    np.testing.assert_array_equal(scene.image_labels, from_boxes)
    in_mask = np.unique(scene.mask)
    in_mask = in_mask[(in_mask > 0) & (in_mask != schema.IGNORE_LABEL)]
    np.testing.assert_array_equal(np.flatnonzero(scene.image_labels) + 1,
                                  in_mask)
    # Outside the band the mask is the class of the visible instance.
    classes = np.concatenate([[0], scene.box_labels])[scene.instances]
    keep = scene.mask != schema.IGNORE_LABEL
    np.testing.assert_array_equal(scene.mask[keep], classes[keep])


def test_ignore_band_is_thin_and_on_instance_boundaries():
  ignored_fraction = []
  for scene in _scenes(size=128, count=8):
    inst = np.pad(scene.instances, 1, mode='edge')
    h, w = scene.instances.shape
    neighbours = np.stack([inst[dy:dy + h, dx:dx + w]
                           for dy in range(3) for dx in range(3)])
    mixed = (neighbours != scene.instances).any(axis=0)
    ignored = scene.mask == schema.IGNORE_LABEL
    # At 128 px the band is exactly the pixels with another instance among
    # their 8 neighbours: one pixel on each side of every boundary.
    np.testing.assert_array_equal(ignored, mixed)
    assert ignored.any()
    ignored_fraction.append(ignored.mean())
  assert 0.005 < np.mean(ignored_fraction) < 0.1


def test_small_and_hidden_objects_are_dropped():
  minimum = render.MIN_VISIBLE_PIXELS
  for scene in _scenes(size=128, count=20, max_objects=8):
    counts = np.bincount(scene.instances.ravel(),
                         minlength=len(scene.boxes) + 1)[1:]
    assert np.all(counts >= minimum)


def test_min_objects_is_respected():
  for scene in _scenes(count=10, min_objects=3, max_objects=5):
    assert len(scene.boxes) >= 3


def test_objects_do_not_fill_their_boxes():
  fills = {name: [] for name in render.SHAPES['main']}
  for scene in _scenes(size=96, count=40):
    areas = box_lib.box_areas(scene.boxes)
    for index, (label, area) in enumerate(zip(scene.box_labels, areas), 1):
      visible = np.count_nonzero(scene.instances == index)
      fills[render.SHAPES['main'][label - 1]].append(visible / area)
  means = {name: np.mean(values) for name, values in fills.items()}
  assert means['ellipse'] > 0.7
  assert means['crescent'] < 0.55 and means['star'] < 0.6
  assert np.mean(np.concatenate(list(fills.values()))) < 0.7


def test_polygon_sdf_matches_hand_computed_distances():
  square = np.asarray([(-1, -1), (1, -1), (1, 1), (-1, 1)], np.float32)
  u = np.asarray([0.0, 0.5, 2.0, 2.0, -1.0], np.float32)
  v = np.asarray([0.0, 0.0, 0.0, 2.0, 0.0], np.float32)
  np.testing.assert_allclose(geometry.polygon_sdf(square, u, v),
                             [-1.0, -0.5, 1.0, np.sqrt(2.0), 0.0], atol=1e-6)
  # A concave "L": the notch (0.5, 0.5) is outside, the corner arm inside.
  ell = np.asarray([(0, 0), (1, 0), (1, 0.4), (0.4, 0.4), (0.4, 1), (0, 1)],
                   np.float32)
  sd = geometry.polygon_sdf(ell, np.asarray([0.7, 0.2], np.float32),
                           np.asarray([0.7, 0.7], np.float32))
  np.testing.assert_allclose(sd, [0.3, -0.2], atol=1e-6)


@pytest.mark.parametrize('shape', render.SHAPES['main'] + render.SHAPES['aux']
                         + render.SHAPES['pretrain'])
def test_every_shape_is_non_empty_and_within_reach(shape):
  u, v = np.meshgrid(*(2 * [np.linspace(-2, 2, 161, dtype=np.float32)]))
  for seed in range(5):
    sdf, reach = geometry.shape_sdf(shape, np.random.default_rng(seed))
    inside = sdf(u, v) < 0
    assert inside.mean() > 0.02
    assert 0.5 < reach <= np.sqrt(2.0)
    assert np.hypot(u, v)[inside].max() <= reach + 1e-6


@pytest.mark.parametrize('kwargs, field', [
    (dict(image_size=8), 'image_size'),
    (dict(num_classes=0), 'num_classes'),
    (dict(min_objects=3, max_objects=2), 'min_objects'),
    (dict(max_objects=render.MAX_OBJECTS + 1), 'max_objects'),
])
def test_bad_parameters_name_the_field(kwargs, field):
  args = dict(image_size=32, num_classes=6, min_objects=1, max_objects=4)
  args.update(kwargs)
  with pytest.raises(ValueError, match=field):
    render.render_example(np.random.default_rng(0), **args)


# ----------------------------------------------------------------------------
# Builder and registry
# ----------------------------------------------------------------------------
def test_config_name_encodes_every_setting():
  base = dict(image_size=64, num_classes=5, num_train=10, num_val=3,
              min_objects=2, max_objects=3, seed=7, family='aux')
  assert builder.shapes_config(**base).name == 'aux_s64_k5_n10-3_o2-3_seed7'
  names = {builder.shapes_config(**base).name}
  for field, value in (('image_size', 65), ('num_classes', 4),
                       ('num_train', 11), ('num_val', 4), ('min_objects', 1),
                       ('max_objects', 4), ('seed', 8), ('family', 'main')):
    names.add(builder.shapes_config(**{**base, field: value}).name)
  assert len(names) == 9
  with pytest.raises(ValueError, match='num_val'):
    builder.shapes_config(num_val=0)
  with pytest.raises(ValueError, match='image_size'):
    builder.shapes_config(image_size=64.5)
  with pytest.raises(ValueError, match='seed'):
    builder.shapes_config(seed=-1)


def test_make_builder_rejects_other_datasets(tmp_path):
  config = defaults.voc_data()
  with pytest.raises(ValueError, match='config.data.name'):
    builder.make_builder(config, str(tmp_path))


def _tiny_data_config(tmp_path, family: str) -> ml_collections.ConfigDict:
  config = defaults.shapes_data(family)
  config.data_dir = str(tmp_path)
  config.shapes.update(image_size=32, num_train=8, num_val=4, seed=3)
  return config


@pytest.mark.parametrize('family', render.FAMILIES)
def test_registry_reads_back_exactly_what_the_renderer_draws(tmp_path, family,
                                                             capsys):
  data_config = _tiny_data_config(tmp_path, family)
  dataset = registry.open_dataset(data_config)
  printed = capsys.readouterr().out.strip().splitlines()
  assert len(printed) == 1 and '12 examples' in printed[0]
  assert dataset.class_names == render.class_names(family, 6)
  assert dataset.skipped == []
  assert set(dataset.splits) == {'train', 'val'}
  config = dataset.builder.builder_config
  assert config.name == f'{family}_s32_k6_n8-4_o1-4_seed3'
  for split, count in (('train', 8), ('val', 4)):
    source = dataset.source(split)
    assert len(source) == count
    index = dataset.index(split)
    assert index.image_ids == tuple(
        render.image_id(family, split, i) for i in range(count))
    assert np.all(index.heights == 32) and np.all(index.widths == 32)
    for i in range(count):
      got = source[i]
      want = encode.render_indexed(encode.RenderSettings.of(config), split, i)
      assert got.keys() == want.keys()
      assert got[schema.IMAGE_ID] == want[schema.IMAGE_ID]
      for key in (schema.IMAGE, schema.MASK, schema.BOXES,
                  schema.BOX_LABELS, schema.IMAGE_LABELS):
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # A second open reuses the cache (no preparation, metadata read back).
  again = registry.open_dataset(data_config)
  assert capsys.readouterr().out == ''
  assert again.class_names == dataset.class_names and again.skipped == []


_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
_PREPARE_SCRIPT = """
import sys
from wsss_jax import defaults
from wsss_jax.data.shapes import builder
config = defaults.shapes_data()
config.shapes.update(image_size=32, num_train=6, num_val=2, seed=3)
builder.prepare(builder.make_builder(config, sys.argv[1]))
"""


def test_workers_render_the_same_bytes_in_the_same_order():
  settings = encode.RenderSettings(image_size=32, num_classes=6, min_objects=1,
                                   max_objects=4, seed=5, family='hard')
  count = 120                          # three pool items, the last one short
  inline = list(encode.encode_split(settings, 'train', count, workers=0))
  pooled = list(encode.encode_split(settings, 'train', count, workers=2))
  assert len(pooled) == count
  assert [e[schema.IMAGE_ID] for e in pooled] == [
      render.image_id('hard', 'train', i) for i in range(count)]
  for a, b in zip(inline, pooled):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
  assert encode.default_workers(encode.MIN_EXAMPLES_FOR_WORKERS - 1) == 0
  assert encode.default_workers(10_000) >= 1


def test_same_seed_gives_byte_identical_files(tmp_path):
  # Separate processes with different string-hash seeds: protobuf map order
  # follows the hash seed unless serialization is deterministic.
  files = []
  for hash_seed in ('1', '2'):
    root = tmp_path / hash_seed
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    subprocess.run([sys.executable, '-c', _PREPARE_SCRIPT, str(root)],
                   check=True, env=env, capture_output=True, cwd=_REPO_ROOT)
    files.append({str(p.relative_to(root)): p.read_bytes()
                  for p in sorted(root.rglob('*')) if p.is_file()})
  assert sum('array_record' in name for name in files[0]) == 2
  assert files[0] == files[1]


def test_hard_family_keeps_the_geometry_and_fools_grabcut_inside_boxes():
  """'hard' draws the same scenes as 'main' from the same generator (the
  support regions are painted after the layout is fixed), and GrabCut labels
  far more of the in-box background as foreground there."""
  from wsss_jax.host import grabcut  # pylint: disable=g-import-not-at-top
  assert render.SHAPES['hard'] == render.SHAPES['main']
  false_fg = {}
  for family in ('main', 'hard'):
    wrong = inside = 0
    for index in range(12):
      scene = render.render_scene(np.random.default_rng([5, index]), 96, 6, 1,
                                  4, family)
      if family == 'hard':
        plain = render.render_scene(np.random.default_rng([5, index]), 96, 6,
                                    1, 4, 'main')
        np.testing.assert_array_equal(scene.mask, plain.mask)
        np.testing.assert_array_equal(scene.boxes, plain.boxes)
        assert not np.array_equal(scene.image, plain.image)
      labels, _ = grabcut.grabcut_label_map(scene.image, scene.boxes,
                                            scene.box_labels)
      in_box_background = (grabcut.box_label_map(
          scene.image, scene.boxes, scene.box_labels)[0] > 0) & (
              scene.mask == 0)
      inside += in_box_background.sum()
      wrong += (in_box_background & (labels > 0)).sum()
    false_fg[family] = wrong / inside
  assert false_fg['hard'] > 1.5 * false_fg['main'], false_fg
