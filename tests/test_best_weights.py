"""`training.best.BestWeights` and the loop's after-validation hook: the
weights of the best periodic validation, kept across a resume."""

import dataclasses
import json

import jax
import numpy as np

from wsss_jax.models import weights as weights_lib
from wsss_jax.training import best, loop

from tests.test_loop import _job


def _variables(value):
  return {'params': {'head': {'kernel': np.full((2,), value, np.float32)}}}


def _kernel(path):
  return weights_lib.read_weights(path)['params/head/kernel']


def test_keeps_the_highest_score_and_the_earlier_of_ties(tmp_path):
  keeper = best.BestWeights(str(tmp_path))
  assert keeper.update(2, {'miou': 40.0, 'pixel_acc': 90.0}, _variables(1.0))
  assert not keeper.update(4, {'miou': 35.0}, _variables(2.0))
  assert not keeper.update(6, {'miou': 40.0}, _variables(3.0))   # a tie
  assert keeper.update(8, {'miou': 41.5}, _variables(4.0))
  assert keeper.record['step'] == 8 and keeper.record['score'] == 41.5
  np.testing.assert_array_equal(_kernel(keeper.weights_path), [4.0, 4.0])
  with open(keeper.record_path, encoding='utf-8') as f:
    assert json.load(f)['step'] == 8


def test_non_finite_or_missing_scores_never_win(tmp_path):
  keeper = best.BestWeights(str(tmp_path))
  assert not keeper.update(2, {'miou': float('nan')}, _variables(1.0))
  assert not keeper.update(3, {'pixel_acc': 50.0}, _variables(1.0))
  assert keeper.record is None
  assert keeper.update(4, {'miou': 0.0}, _variables(2.0))


def test_a_resumed_run_compares_against_the_best_before_the_kill(tmp_path):
  best.BestWeights(str(tmp_path)).update(2, {'miou': 50.0}, _variables(1.0))
  resumed = best.BestWeights(str(tmp_path))
  assert resumed.record['score'] == 50.0
  assert not resumed.update(4, {'miou': 45.0}, _variables(2.0))
  np.testing.assert_array_equal(_kernel(resumed.weights_path), [1.0, 1.0])


def test_the_loop_hands_every_validation_to_the_keeper(tmp_path):
  scores = iter([10.0, 30.0, 20.0])      # steps 2, 4 and the final 6
  keeper = best.BestWeights(str(tmp_path / 'best'))
  seen = []

  def after(step, result, variables):
    seen.append(step)
    keeper.update(step, result, variables)

  job = dataclasses.replace(
      _job(tmp_path / 'run'), eval_every=2,
      evaluate=lambda variables: {'miou': next(scores)},
      after_validation=after)
  state, _ = loop.train(job)
  assert seen == [2, 4, 6] and keeper.record['step'] == 4
  # Step 4's weights, not the final ones.
  final = weights_lib.flatten_variables(jax.device_get(state.variables))
  kept = weights_lib.read_weights(keeper.weights_path)
  assert set(kept) == set(final)
  assert any(not np.array_equal(kept[k], np.asarray(final[k])) for k in kept)
