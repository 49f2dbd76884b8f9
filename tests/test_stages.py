"""The stage mechanism: run, skip when complete, rerun when incomplete."""

import json
import os

import numpy as np
import pytest

from wsss_jax import stages


def _stage(name, calls, outputs=(), fail=False):
  def run(context, stage_dir):
    calls.append(name)
    for out in outputs:
      with open(os.path.join(stage_dir, out), 'w') as f:
        f.write('x')
    if fail:
      raise RuntimeError('boom')
    return {'value': len(calls), 'previous': dict(context.results)}
  return stages.Stage(name, run, outputs=outputs)


def test_runs_then_skips_complete_stages(tmp_path):
  calls = []
  pipeline = [_stage('a', calls, ('a.txt',)), _stage('b', calls)]
  context = stages.StageContext(workdir=str(tmp_path))
  records = stages.run_stages(pipeline, context)
  assert [r['status'] for r in records] == ['done', 'done']
  assert records[1]['results']['previous'] == {'a': {'value': 1,
                                                     'previous': {}}}
  again = stages.run_stages(pipeline, stages.StageContext(str(tmp_path)))
  assert [r['status'] for r in again] == ['skipped', 'skipped']
  assert calls == ['a', 'b']
  # Results of skipped stages are restored from their markers.
  assert again[0]['results']['value'] == 1


def test_missing_output_reruns_the_stage(tmp_path):
  calls = []
  pipeline = [_stage('a', calls, ('a.txt',))]
  stages.run_stages(pipeline, stages.StageContext(str(tmp_path)))
  os.remove(tmp_path / 'a' / 'a.txt')
  records = stages.run_stages(pipeline, stages.StageContext(str(tmp_path)))
  assert records[0]['status'] == 'done' and calls == ['a', 'a']


def test_failed_stage_has_no_marker_and_reruns(tmp_path):
  calls = []
  with pytest.raises(RuntimeError):
    stages.run_stages([_stage('a', calls, fail=True)],
                      stages.StageContext(str(tmp_path)))
  assert not os.path.exists(tmp_path / 'a' / stages.MARKER)
  records = stages.run_stages([_stage('a', calls)],
                              stages.StageContext(str(tmp_path)))
  assert records[0]['status'] == 'done'


def test_corrupt_marker_reruns(tmp_path):
  calls = []
  stages.run_stages([_stage('a', calls)], stages.StageContext(str(tmp_path)))
  (tmp_path / 'a' / stages.MARKER).write_text('{not json')
  records = stages.run_stages([_stage('a', calls)],
                              stages.StageContext(str(tmp_path)))
  assert records[0]['status'] == 'done'
  assert json.loads((tmp_path / 'a' / stages.MARKER).read_text())['status'] == 'done'


def test_duplicate_names_rejected(tmp_path):
  with pytest.raises(ValueError, match='unique'):
    stages.run_stages([_stage('a', []), _stage('a', [])],
                      stages.StageContext(str(tmp_path)))


def test_rounds_name_prefix_and_resume_each_round_on_its_own(tmp_path):
  calls = []

  def build(round_no, name):
    # Round k reads round k-1's labels: references resolve through `name`
    # of the earlier round.
    previous = stages.round_name(round_no - 1, 'labels') if round_no > 1 \
        else None
    def train(context, stage_dir):
      calls.append(name('train'))
      return {'read': previous, 'seen': sorted(context.results)}
    return [_stage(name('labels'), calls, ('l.txt',)),
            stages.Stage(name('train'), train)]

  pipeline = stages.rounds(2, build)
  assert [s.name for s in pipeline] == ['round1/labels', 'round1/train',
                                        'round2/labels', 'round2/train']
  context = stages.StageContext(str(tmp_path))
  records = stages.run_stages(pipeline, context)
  assert records[3]['results']['read'] == 'round1/labels'
  assert os.path.exists(tmp_path / 'round2' / 'labels' / 'l.txt')
  # An incomplete round-2 stage reruns alone; round 1 is skipped.
  os.remove(tmp_path / 'round2' / 'labels' / 'l.txt')
  calls.clear()
  again = stages.run_stages(pipeline, stages.StageContext(str(tmp_path)))
  assert [r['status'] for r in again] == ['skipped', 'skipped', 'done',
                                          'skipped']
  assert calls == ['round2/labels']
  with pytest.raises(ValueError, match='start at 1'):
    stages.round_name(0, 'train')


# ---------------------------------------------------------------------------
# A changed config redoes exactly the stages that read a changed field
# ---------------------------------------------------------------------------
def _trainer(name, calls, weights_from=None):
  """A 'training' stage: writes model.npz of `weights_from(fields)`."""
  def run(context, stage_dir):
    calls.append(name)
    resumed = os.path.exists(os.path.join(stage_dir, 'checkpoint.txt'))
    with open(os.path.join(stage_dir, 'checkpoint.txt'), 'w') as f:
      f.write('state')
    np.savez(os.path.join(stage_dir, 'model.npz'),
             w=np.asarray(weights_from() if weights_from else 1.0))
    return {'resumed': resumed}
  return stages.Stage(name, run, outputs=('model.npz',),
                      network=stages.Network(name, None),
                      ignores=('eval',), extends=('train.num_steps',))


def _pipeline(calls, weight):
  evaluate = _stage('evaluate', calls, ('scores.txt',))
  return [_trainer('train', calls, lambda: weight[0]),
          stages.Stage('evaluate', evaluate.run, outputs=evaluate.outputs,
                       network=stages.Network('train', None))]


def _run(tmp_path, pipeline, fields, previous=None):
  return stages.run_stages(pipeline, stages.StageContext(str(tmp_path)),
                           fields, previous)


FIELDS = {'train.num_steps': 10, 'optim.lr': 0.1, 'eval.crf': False}


def test_an_evaluation_setting_reruns_only_the_evaluation(tmp_path, caplog):
  calls, weight = [], [1.0]
  _run(tmp_path, _pipeline(calls, weight), FIELDS)
  calls.clear()
  with caplog.at_level('INFO'):
    records = _run(tmp_path, _pipeline(calls, weight),
                   dict(FIELDS, **{'eval.crf': True}))
  assert [r['status'] for r in records] == ['skipped', 'done']
  assert calls == ['evaluate']
  assert "eval.crf: False -> True" in caplog.text
  marker = json.loads((tmp_path / 'evaluate' / stages.MARKER).read_text())
  assert marker['config']['eval.crf'] is True
  assert 'eval.crf' not in json.loads(
      (tmp_path / 'train' / stages.MARKER).read_text())['config']


def test_a_field_the_stage_now_ignores_does_not_rerun_it(tmp_path):
  calls, weight = [], [1.0]
  _run(tmp_path, _pipeline(calls, weight), FIELDS)
  calls.clear()
  # A later version of the stage ignores optim.lr (its marker recorded it).
  pipeline = _pipeline(calls, weight)
  pipeline[0] = stages.Stage(
      'train', pipeline[0].run, outputs=pipeline[0].outputs,
      network=pipeline[0].network, ignores=('eval', 'optim.lr'),
      extends=pipeline[0].extends)
  records = _run(tmp_path, pipeline, dict(FIELDS, **{'optim.lr': 0.2}))
  assert [r['status'] for r in records] == ['skipped', 'done']
  assert calls == ['evaluate']       # the evaluation reads optim.lr


def test_more_steps_continue_training_and_rerun_what_follows(tmp_path):
  calls, weight = [], [1.0]
  _run(tmp_path, _pipeline(calls, weight), FIELDS)
  calls.clear()
  weight[0] = 2.0            # the continued training ends elsewhere
  records = _run(tmp_path, _pipeline(calls, weight),
                 dict(FIELDS, **{'train.num_steps': 20}))
  assert calls == ['train', 'evaluate']
  assert records[0]['results']['resumed'] is True   # its state was kept
  assert not list(tmp_path.glob('train.replaced-*'))


def test_other_training_changes_restart_and_keep_the_old_training(tmp_path):
  calls, weight = [], [1.0]
  _run(tmp_path, _pipeline(calls, weight), FIELDS)
  calls.clear()
  weight[0] = 3.0
  records = _run(tmp_path, _pipeline(calls, weight),
                 dict(FIELDS, **{'optim.lr': 0.2}))
  assert calls == ['train', 'evaluate']
  assert records[0]['results']['resumed'] is False   # started over
  kept = list(tmp_path.glob('train.replaced-*'))
  assert len(kept) == 1 and (kept[0] / 'model.npz').exists()
  # An evaluation is redone in place: it trains nothing worth keeping.
  assert not list(tmp_path.glob('evaluate.replaced-*'))
  calls.clear()               # fewer steps is not a continuation either
  records = _run(tmp_path, _pipeline(calls, weight),
                 dict(FIELDS, **{'optim.lr': 0.2, 'train.num_steps': 5}))
  assert records[0]['results']['resumed'] is False


def test_a_redone_stage_with_identical_output_reruns_nothing_after_it(
    tmp_path):
  calls = []
  labels = _stage('labels', calls)      # reads no optimiser field itself
  labels = stages.Stage('labels', labels.run, ignores=('optim',))
  pipeline = [_trainer('train', calls), labels]
  _run(tmp_path, pipeline, FIELDS)
  calls.clear()
  records = _run(tmp_path, pipeline,                    # same weights
                 dict(FIELDS, **{'optim.lr': 0.2}))
  assert calls == ['train']
  assert [r['status'] for r in records] == ['done', 'skipped']


def test_interrupted_stage_with_another_config_starts_over(tmp_path):
  calls, weight = [], [1.0]
  pipeline = _pipeline(calls, weight)
  (tmp_path / 'train').mkdir()
  (tmp_path / 'train' / 'checkpoint.txt').write_text('old state')
  (tmp_path / 'train' / stages.STARTED).write_text(json.dumps(
      {'config': dict(FIELDS, **{'optim.lr': 0.5})}))
  records = _run(tmp_path, pipeline, FIELDS)
  assert records[0]['results']['resumed'] is False
  # With the same config it would have resumed.
  (tmp_path / 'train' / stages.MARKER).unlink()
  records = _run(tmp_path, pipeline, FIELDS)
  assert records[0]['results']['resumed'] is True


def test_markers_without_a_recorded_config(tmp_path):
  """Older workdirs compare the config.json they had; stages copied into a
  new workdir (no previous config) are trusted."""
  calls, weight = [], [1.0]
  _run(tmp_path, _pipeline(calls, weight), None)     # records no config
  calls.clear()
  assert [r['status'] for r in _run(tmp_path, _pipeline(calls, weight),
                                    FIELDS)] == ['skipped', 'skipped']
  for name in ('train', 'evaluate'):
    marker = json.loads((tmp_path / name / stages.MARKER).read_text())
    marker.pop('config', None)
    (tmp_path / name / stages.MARKER).write_text(json.dumps(marker))
  records = _run(tmp_path, _pipeline(calls, weight),
                 dict(FIELDS, **{'eval.crf': True}), previous=FIELDS)
  assert [r['status'] for r in records] == ['skipped', 'done']


def test_a_stage_built_from_its_own_config_compares_that_config(tmp_path):
  """BANA's Labeler trains with its own step count: raising the run's
  train.num_steps leaves it alone."""
  calls = []
  labeler = _trainer('classifier', calls)
  own = {'train.num_steps': 50, 'optim.lr': 0.1}

  def own_fields(stage):
    return own if stage.name == 'classifier' else None

  def run_with(fields):
    return stages.run_stages([labeler, _stage('labels', calls)],
                             stages.StageContext(str(tmp_path)), fields,
                             None, own_fields)
  run_with(FIELDS)
  calls.clear()
  records = run_with(dict(FIELDS, **{'train.num_steps': 99}))
  assert records[0]['status'] == 'skipped' and calls == ['labels']
  own['optim.lr'] = 0.3          # its own field: it reruns (same weights here,
  calls.clear()                  # so what follows does not)
  run_with(dict(FIELDS, **{'train.num_steps': 99}))
  assert calls == ['classifier']


# ----------------------------------------------------------------------------
# Side stages
# ----------------------------------------------------------------------------
def _threaded_stage(name, log, *, side=False, waits_for=(), gate=None,
                    wait_on=None, fail=False):
  """Records (name, thread name); with `wait_on`, blocks until that event is
  set (by a stage in the other thread) — the test deadlocks, and times out,
  unless the two really run at once."""
  def run(context, stage_dir):  # pylint: disable=unused-argument
    import threading
    log.append((name, threading.current_thread().name))
    if wait_on is not None:
      assert wait_on.wait(timeout=20), f'{name}: the other lane never ran'
    if gate is not None:
      gate.set()
    if fail:
      raise RuntimeError(f'{name} failed')
    return {'seen': sorted(context.results)}
  return stages.Stage(name, run, side=side, waits_for=waits_for)


def test_side_stages_run_beside_the_main_line(tmp_path):
  import threading
  started = threading.Event()
  log = []
  pipeline = [
      _threaded_stage('first', log),
      _threaded_stage('side_a', log, side=True, gate=started),
      _threaded_stage('side_b', log, side=True),
      # Blocks until side_a ran: only possible if side_a is in another thread.
      _threaded_stage('main', log, wait_on=started),
      _threaded_stage('last', log, waits_for=('side_b',)),
  ]
  records = stages.run_stages(pipeline, stages.StageContext(str(tmp_path)))
  assert [r['name'] for r in records] == [s.name for s in pipeline]
  threads = dict(log)
  assert threads['side_a'] == threads['side_b'] == 'side-stages'
  assert threads['first'] == threads['main'] == threads['last']
  assert threads['main'] != 'side-stages'
  # The side stages saw what was listed before them; `last` saw side_b.
  by_name = {r['name']: r['results'] for r in records}
  assert 'first' in by_name['side_a']['seen']
  assert 'side_b' in by_name['last']['seen']
  # Complete: a rerun skips all of them, side stages included.
  again = stages.run_stages(pipeline, stages.StageContext(str(tmp_path)))
  assert {r['status'] for r in again} == {'skipped'}


def test_side_stages_run_inline_when_turned_off(tmp_path, monkeypatch):
  monkeypatch.setenv(stages.SIDE_STAGES_ENV, '0')
  log = []
  pipeline = [_threaded_stage('first', log),
              _threaded_stage('side', log, side=True),
              _threaded_stage('main', log)]
  stages.run_stages(pipeline, stages.StageContext(str(tmp_path)))
  assert [name for name, _ in log] == ['first', 'side', 'main']
  assert len({thread for _, thread in log}) == 1


def test_a_failing_side_stage_fails_the_run_and_keeps_no_marker(tmp_path):
  log = []
  pipeline = [_threaded_stage('side', log, side=True, fail=True),
              _threaded_stage('after', log, side=True),
              _threaded_stage('main', log)]
  with pytest.raises(RuntimeError, match='side failed'):
    stages.run_stages(pipeline, stages.StageContext(str(tmp_path)))
  assert not os.path.exists(tmp_path / 'side' / stages.MARKER)
  # The side stage after the failed one did not run.
  assert 'after' not in dict(log)
  # The main line finished its own stage meanwhile; a rerun redoes the rest.
  assert os.path.exists(tmp_path / 'main' / stages.MARKER)
  log.clear()
  pipeline[0] = _threaded_stage('side', log, side=True)
  records = stages.run_stages(pipeline, stages.StageContext(str(tmp_path)))
  assert [r['status'] for r in records] == ['done', 'done', 'skipped']


def test_waiting_for_a_stage_that_is_not_an_earlier_side_stage_is_refused(
    tmp_path):
  log = []
  for pipeline in ([_threaded_stage('a', log),
                    _threaded_stage('b', log, waits_for=('a',))],
                   [_threaded_stage('b', log, waits_for=('s',)),
                    _threaded_stage('s', log, side=True)]):
    with pytest.raises(ValueError, match='not side stages listed before'):
      stages.run_stages(pipeline, stages.StageContext(str(tmp_path)))
  assert not log
