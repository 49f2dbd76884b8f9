"""Console scripts and packaged configs: the tool works after any install."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import tomllib

from wsss_jax import configs, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_console_script_names_a_callable():
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    scripts = tomllib.load(f)['project']['scripts']
  assert set(scripts) == {'wsss-train', 'wsss-predict', 'wsss-prepare',
                          'wsss-convert'}
  for target in scripts.values():
    # Read, not imported: importing would define absl flags that other test
    # modules' scripts define too.
    module, function = target.split(':')
    with open(importlib.util.find_spec(module).origin) as f:
      tree = ast.parse(f.read())
    assert function in {node.name for node in tree.body
                        if isinstance(node, ast.FunctionDef)}, target


def test_checkout_configs_are_the_packaged_ones():
  names = configs.available()
  assert {'supervised', 'box_baseline', 'box2seg', 'bana'} <= set(names)
  for name in names:
    shim = run.load_config_file(os.path.join(REPO, 'configs', f'{name}.py'))
    packaged = run.load_config_file(configs.path_of(name))
    assert shim.to_dict() == packaged.to_dict()


def test_a_bare_config_name_resolves_to_the_packaged_file(tmp_path,
                                                          monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert run.resolve_config_arg('--config=box2seg:grabcut') == (
      f'--config={configs.path_of("box2seg")}:grabcut')
  assert run.resolve_config_arg('--config=configs/x.py') == (
      '--config=configs/x.py')
  assert run.resolve_config_arg('--workdir=box2seg') == '--workdir=box2seg'
  (tmp_path / 'box2seg').write_text('')         # a local file wins
  assert run.resolve_config_arg('--config=box2seg') == '--config=box2seg'


def test_packaged_config_works_outside_a_checkout(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'wsss_jax.main', '--config=supervised:nonsense',
       f'--workdir={tmp_path / "run"}'], cwd=tmp_path, capture_output=True,
      text=True, timeout=300, check=False)
  assert result.returncode == 2
  assert "Unknown variant 'nonsense' for config 'supervised'" in result.stderr
