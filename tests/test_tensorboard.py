"""TensorBoard events and log lines of a training stage."""

from __future__ import annotations

import glob
import os
import struct

import pytest
from tensorboardX.proto import event_pb2

from wsss_jax import run
from wsss_jax.training import history, loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_events(path):
  """Every Event of a TFRecord events file (length, crc, data, crc)."""
  events = []
  with open(path, 'rb') as f:
    while header := f.read(12):
      (length,) = struct.unpack('<Q', header[:8])
      data = f.read(length)
      f.read(4)
      events.append(event_pb2.Event.FromString(data))
  return events


def test_tags_carry_no_stage_and_group_the_losses():
  assert history.tensorboard_tag('train', 'loss') == 'loss/total'
  assert history.tensorboard_tag('train', 'affinity') == 'loss/affinity'
  assert history.tensorboard_tag('train', 'lr') == 'lr'
  assert history.tensorboard_tag('train', 'grad_norm') == 'optim/grad_norm'
  assert history.tensorboard_tag('val', 'miou') == 'val/miou'


def test_progress_line_has_rates_and_eta():
  line = loop.progress_line(200, 700, {'loss': 0.41234, 'lr': 9.3e-4},
                            4.0, 8)
  assert line == ('step 200/700 (28%): loss=0.4123 lr=0.00093 | 4 step/s, '
                  '32 img/s | ETA 2:05')
  assert loop.progress_line(700, 700, {'loss': 1.0}, 4.0, 8).endswith(
      '32 img/s')
  assert loop.progress_line(1, 700, {'loss': 1.0}, None, 8) == (
      'step 1/700 (0%): loss=1')


@pytest.mark.slow          # one tiny run: ~20 s
def test_one_events_file_per_stage_with_scalars_config_and_images(
    tmp_path, caplog):
  config = run.load_config_file(
      os.path.join(REPO, 'configs', 'supervised.py'), 'tiny')
  config.train.eval_every = 1
  with caplog.at_level('INFO', logger='wsss_jax'):
    run.train_and_evaluate(config, str(tmp_path))
  files = glob.glob(str(tmp_path / 'train' / 'tb' / 'events.out.tfevents.*'))
  assert len(files) == 1        # the final validation did not open a second
  tags, texts, images = {}, [], []
  for event in read_events(files[0]):
    for value in event.summary.value:
      if value.HasField('image'):
        images.append((value.tag, event.step))
      elif value.metadata.plugin_data.plugin_name == 'text':
        texts.append(value.tag)
      else:
        tags.setdefault(value.tag, []).append(event.step)
  assert tags['loss/total'] == [1, 2] and tags['lr'] == [1, 2]
  assert tags['val/miou'] == [1, 2]
  assert not any(tag.startswith('train/train') for tag in tags)
  assert any(tag.startswith('config') for tag in texts)
  assert images == [('val/predictions', 1), ('val/predictions', 2)]
  lines = [r.getMessage() for r in caplog.records
           if r.getMessage().startswith('[train] step 2/2 (100%)')]
  assert lines and 'lr=' in lines[0] and 'step/s' in lines[0]


def test_progress_bars_are_drawn_only_from_the_main_thread(monkeypatch):
  import threading
  from wsss_jax import progress
  monkeypatch.setenv(progress.PROGRESS_ENV, '1')
  assert progress.bars_enabled()
  seen = []
  thread = threading.Thread(target=lambda: seen.append(
      progress.bars_enabled()))
  thread.start()
  thread.join()
  assert seen == [False]
