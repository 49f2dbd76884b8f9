"""The stage mechanism: run, skip when complete, rerun when incomplete."""

import json
import os

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
