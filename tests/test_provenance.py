"""results.json's provenance: commit, dirty flag, command line, time."""

from __future__ import annotations

import datetime
import subprocess

import pytest

from wsss_jax.reporting import provenance


def _git(repo, *args):
  subprocess.run(['git', '-c', 'user.name=t', '-c', 'user.email=t@t', *args],
                 cwd=repo, check=True, capture_output=True)


def test_git_state_follows_tracked_changes_only(tmp_path, monkeypatch):
  _git(tmp_path, 'init', '-q')
  (tmp_path / 'code.py').write_text('x = 1\n')
  _git(tmp_path, 'add', 'code.py')
  _git(tmp_path, 'commit', '-q', '-m', 'first')
  head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=tmp_path,
                        check=True, capture_output=True, text=True
                        ).stdout.strip()
  monkeypatch.setattr(provenance, '_SOURCE_DIR', str(tmp_path))
  (tmp_path / 'runs.txt').write_text('untracked output\n')
  assert provenance.git_state() == {'git_commit': head, 'git_dirty': False}
  (tmp_path / 'code.py').write_text('x = 2\n')
  assert provenance.git_state() == {'git_commit': head, 'git_dirty': True}


def test_outside_a_checkout_the_commit_is_unknown(tmp_path, monkeypatch):
  monkeypatch.setattr(provenance, '_SOURCE_DIR', str(tmp_path))
  monkeypatch.setenv('GIT_CEILING_DIRECTORIES', str(tmp_path.parent))
  assert provenance.git_state() == {'git_commit': None, 'git_dirty': None}


def test_provenance_fields():
  record = provenance.provenance(['python', '-m', 'wsss_jax.main', '--x=1'])
  assert record['argv'] == ['python', '-m', 'wsss_jax.main', '--x=1']
  written = datetime.datetime.fromisoformat(record['time'])
  assert written.tzinfo is not None
  assert abs((datetime.datetime.now(datetime.timezone.utc) - written
              ).total_seconds()) < 60
  assert {'git_commit', 'git_dirty', 'machine'} <= set(record)
  assert record['machine']['cpu_count'] >= 1 and record['machine']['cpu']


@pytest.mark.parametrize('package', ['jax', 'numpy', 'pydensecrf2'])
def test_versions_name_the_scientific_stack(package):
  assert package in provenance.versions()
