"""The `python -m wsss_jax.data.prepare` command and its shared file checks."""

from __future__ import annotations

import io
import pathlib
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from wsss_jax import defaults
from wsss_jax.data import prepare
from wsss_jax.data import schema

DATA = pathlib.Path(__file__).parent / 'data'
VOC_MINI = DATA / 'voc_mini'


def test_voc_command_is_idempotent(tmp_path, capsys):
  args = ['voc', f'--voc_root={VOC_MINI}', f'--data_dir={tmp_path}']
  assert prepare.main(args) == 0
  out = capsys.readouterr().out
  assert 'train: 14, val: 3' in out
  assert 'train_aug: skipped, no SBD and no SegmentationClassAug' in out
  assert "train: 11 image(s) without XML" in out
  assert (tmp_path / 'wsss_voc' / 'voc2012' / '1.0.0'
          / 'dataset_info.json').exists()
  assert prepare.main(args) == 0
  out = capsys.readouterr().out
  assert 'already prepared' in out and 'nothing to do' in out
  assert 'Downloading and preparing' not in out


def test_new_inputs_hint_then_overwrite(tmp_path, capsys):
  voc = tmp_path / 'VOC2012'
  shutil.copytree(VOC_MINI, voc)
  aug = tmp_path / 'SegmentationClassAug'
  aug.mkdir()
  for image_id in ('2007_000032', '2007_000063'):
    mask = np.array(Image.open(voc / 'SegmentationClass' / f'{image_id}.png'))
    Image.fromarray(mask, 'L').save(aug / f'{image_id}.png')
  out_dir = tmp_path / 'out'
  base = ['voc', f'--voc_root={voc}', f'--data_dir={out_dir}']
  assert prepare.main(base) == 0
  capsys.readouterr()
  assert prepare.main(base + [f'--seg_aug_root={aug}']) == 0
  out = capsys.readouterr().out
  assert "inputs for ['train_aug'] are now available" in out
  assert prepare.main(base + [f'--seg_aug_root={aug}', '--overwrite']) == 0
  out = capsys.readouterr().out
  # VOC train (14 ids) U SegAug masks - VOC val.
  assert 'train: 14, train_aug: 14, val: 3' in out


def test_coco_command(tmp_path, capsys):
  args = ['coco', f'--coco_root={DATA / "coco_mini"}', '--class_set=non_voc',
          f'--data_dir={tmp_path}']
  assert prepare.main(args) == 0
  out = capsys.readouterr().out
  assert 'non_voc_train2017_val2017: prepared' in out
  assert 'train: 32, val: 6' in out
  assert prepare.main(args) == 0
  assert 'already prepared' in capsys.readouterr().out


def test_missing_roots_exit_nonzero(tmp_path, capsys):
  missing = tmp_path / 'no_voc'
  assert prepare.main(['voc', f'--voc_root={missing}',
                       f'--data_dir={tmp_path}']) == 2
  err = capsys.readouterr().err
  assert str(missing) in err and 'JPEGImages' in err
  assert prepare.main(['voc', f'--voc_root={VOC_MINI}',
                       f'--sbd_root={tmp_path / "no_sbd"}',
                       f'--data_dir={tmp_path}']) == 2
  assert 'no_sbd' in capsys.readouterr().err
  assert prepare.main(['coco', f'--coco_root={missing}',
                       f'--data_dir={tmp_path}']) == 2
  assert str(missing) in capsys.readouterr().err
  with pytest.raises(SystemExit):   # argparse: exclusive options
    prepare.main(['voc', f'--voc_root={VOC_MINI}', '--sbd_root=a',
                  '--seg_aug_root=b'])


def test_module_entry_point(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'wsss_jax.data.prepare', 'coco',
       f'--coco_root={tmp_path / "absent"}', f'--data_dir={tmp_path}'],
      capture_output=True, text=True, check=False, timeout=120)
  assert result.returncode == 2
  assert 'absent is not a directory' in result.stderr


def test_shapes_command_goes_through_registry(tmp_path, monkeypatch, capsys):
  pytest.importorskip('wsss_jax.data.shapes.builder')
  small = defaults.shapes_data()
  small.shapes.update(image_size=32, num_train=4, num_val=2)
  monkeypatch.setattr(defaults, 'shapes_data', lambda aux=False: small)
  assert prepare.main(['shapes', f'--data_dir={tmp_path}']) == 0
  assert 'train: 4, val: 2' in capsys.readouterr().out
  assert prepare.main(['shapes', f'--data_dir={tmp_path}']) == 0
  assert 'already prepared' in capsys.readouterr().out


# ----------------------------------------------------------------------------
# Shared raw-file checks
# ----------------------------------------------------------------------------
def test_read_image_checks_and_reencodes(tmp_path):
  path = VOC_MINI / 'JPEGImages' / '2007_000032.jpg'
  checked = prepare.read_image(str(path))
  assert (checked.width, checked.height) == (500, 281)
  assert checked.data == path.read_bytes() and not checked.reencoded
  truncated = tmp_path / 'cut.jpg'
  truncated.write_bytes(path.read_bytes()[:4000])
  with pytest.raises(prepare.BadFileError, match='corrupt image'):
    prepare.read_image(str(truncated))
  with pytest.raises(prepare.BadFileError, match='unreadable image'):
    prepare.read_image(str(tmp_path / 'missing.jpg'))
  cmyk = tmp_path / 'cmyk.jpg'
  Image.new('CMYK', (6, 4), (0, 255, 0, 0)).save(cmyk)
  checked = prepare.read_image(str(cmyk))
  assert checked.reencoded
  with Image.open(io.BytesIO(checked.data)) as image:
    assert image.mode == 'RGB' and image.size == (6, 4)


def test_read_label_png_gives_indices_not_colours(tmp_path):
  path = VOC_MINI / 'SegmentationClass' / '2007_000032.png'
  mask = prepare.read_label_png(str(path))
  assert mask.dtype == np.uint8 and mask.shape == (281, 500)
  assert set(np.unique(mask).tolist()) == {0, 1, 15, 255}
  stored = prepare.mask_image(mask)
  assert stored.mode == 'L'
  np.testing.assert_array_equal(np.array(stored), mask)


def test_features_match_schema():
  spec = prepare.features(20)
  assert set(spec.keys()) == {schema.IMAGE, schema.MASK, schema.BOXES,
                              schema.BOX_LABELS, schema.IMAGE_LABELS,
                              schema.IMAGE_ID}
  assert spec[schema.IMAGE_LABELS].shape == (20,)
  assert spec[schema.MASK].shape == (None, None, 1)
  assert spec[schema.IMAGE].encoding_format == 'jpeg'


def test_dashed_flag_spellings_are_accepted_too(tmp_path):
  assert prepare.main(['shapes', f'--data-dir={tmp_path}']) == 0
  parsed = prepare._parser().parse_args(  # pylint: disable=protected-access
      ['voc', '--voc-root=a', '--seg-aug-root=b', '--data-dir=c'])
  assert (parsed.voc_root, parsed.seg_aug_root, parsed.data_dir) == (
      'a', 'b', 'c')
