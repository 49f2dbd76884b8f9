"""Rules about the repository itself: citations resolve inside it, the layers
keep their import directions, and no module import cycle exists."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'wsss_jax'


def _files(*folders: str, suffix: str = ''):
  for folder in folders:
    for root, dirs, names in os.walk(os.path.join(REPO, folder)):
      dirs[:] = sorted(d for d in dirs if d != '__pycache__')
      for name in sorted(names):
        if name.endswith(suffix) and not name.endswith('.pyc'):
          yield os.path.join(root, name)


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, REPO)[:-len('.py')].split(os.sep)
  if rel[-1] == '__init__':
    rel = rel[:-1]
  return '.'.join(rel)


def _modules() -> dict[str, str]:
  """{dotted module name: path} for every module under wsss_jax/."""
  return {_module_name(p): p for p in _files(PACKAGE, suffix='.py')}


def _imported_modules(name: str, path: str, known: set[str]) -> set[str]:
  """The wsss_jax modules `name` imports anywhere in its file (functions
  included).  `from a.b import c` is module a.b.c when that is a module, else
  a.b; `import a.b` is a.b; relative imports are resolved against the package
  of `name`."""
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read(), filename=path)
  is_package = os.path.basename(path) == '__init__.py'
  package = name if is_package else name.rpartition('.')[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        found.add(alias.name)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        parts = package.split('.')
        base = '.'.join(parts[:len(parts) - (node.level - 1)])
        base = f'{base}.{node.module}' if node.module else base
      else:
        base = node.module or ''
      for alias in node.names:
        candidate = f'{base}.{alias.name}'
        found.add(candidate if candidate in known else base)
  return {m for m in found
          if (m == PACKAGE or m.startswith(PACKAGE + '.')) and m != name}


def _import_graph() -> dict[str, set[str]]:
  modules = _modules()
  known = set(modules)
  graph = {}
  for name, path in modules.items():
    targets = set()
    for target in _imported_modules(name, path, known):
      # `import wsss_jax.x.y` of a name that is not a module file: its
      # nearest module prefix.
      while target not in known and '.' in target:
        target = target.rpartition('.')[0]
      if target in known and target != name:
        targets.add(target)
    graph[name] = targets
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle (a -> ... -> a) per strongly connected component of more than
  one module (Tarjan), shortest found by breadth-first search."""
  index, low, on_stack, stack, components = {}, {}, set(), [], []
  counter = [0]

  def connect(v):
    # Iterative Tarjan: (node, iterator over successors).
    work = [(v, iter(sorted(graph[v])))]
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    while work:
      node, successors = work[-1]
      advanced = False
      for w in successors:
        if w not in index:
          index[w] = low[w] = counter[0]
          counter[0] += 1
          stack.append(w)
          on_stack.add(w)
          work.append((w, iter(sorted(graph[w]))))
          advanced = True
          break
        if w in on_stack:
          low[node] = min(low[node], index[w])
      if advanced:
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          w = stack.pop()
          on_stack.discard(w)
          component.append(w)
          if w == node:
            break
        if len(component) > 1:
          components.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      connect(v)

  cycles = []
  for component in components:
    members = set(component)
    start = component[0]
    parents, frontier = {start: None}, [start]
    path = None
    while frontier and path is None:
      nxt = []
      for v in frontier:
        for w in sorted(graph[v] & members):
          if w == start:
            path = [w]
            while v is not None:
              path.append(v)
              v = parents[v]
            path.reverse()
            break
          if w not in parents:
            parents[w] = v
            nxt.append(w)
        if path:
          break
      frontier = nxt
    cycles.append(path)
  return cycles


# ----------------------------------------------------------------------------
# (a) every citation resolves inside the repository
# ----------------------------------------------------------------------------
def test_no_citation_of_private_reference_notes():
  offenders = []
  for path in _files(PACKAGE, 'configs'):
    with open(path, 'rb') as f:
      data = f.read()
    for number, line in enumerate(data.splitlines(), 1):
      if b'reference/' in line:
        offenders.append(f'{os.path.relpath(path, REPO)}:{number}: '
                         f'{line.decode("utf-8", "replace").strip()}')
  assert not offenders, ('cite a section of a file under docs/ instead of '
                         'the private reference notes:\n'
                         + '\n'.join(offenders))


# ----------------------------------------------------------------------------
# (b) reporting never imports a method
# ----------------------------------------------------------------------------
def test_reporting_imports_no_method():
  modules = _modules()
  known = set(modules)
  offenders = []
  for name, path in sorted(modules.items()):
    if not (name == f'{PACKAGE}.reporting'
            or name.startswith(f'{PACKAGE}.reporting.')):
      continue
    for target in sorted(_imported_modules(name, path, known)):
      if (target == f'{PACKAGE}.methods'
          or target.startswith(f'{PACKAGE}.methods.')):
        offenders.append(f'{name} imports {target}')
  assert not offenders, '\n'.join(offenders)


# ----------------------------------------------------------------------------
# (c) no import cycle among wsss_jax modules
# ----------------------------------------------------------------------------
def test_cycle_finder_finds_a_cycle():
  graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a', 'd'}, 'd': set(), 'e': {'e'}}
  assert _cycles(graph) == [['a', 'b', 'c', 'a']]


def test_import_resolution():
  known = set(_modules())
  path = os.path.join(REPO, PACKAGE, 'methods', 'bana', 'objective.py')
  imported = _imported_modules(f'{PACKAGE}.methods.bana.objective', path,
                               known)
  # `from wsss_jax.methods.bana import bap as bana_bap` -> the module bap;
  # `from wsss_jax.training.step import LossContext` -> training.step.
  assert f'{PACKAGE}.methods.bana.bap' in imported
  assert f'{PACKAGE}.training.step' in imported


def test_no_import_cycle():
  cycles = _cycles(_import_graph())
  assert not cycles, 'import cycles:\n' + '\n'.join(
      ' -> '.join(cycle) for cycle in cycles)


# ----------------------------------------------------------------------------
# (d) the method registry imports no method package by itself
# ----------------------------------------------------------------------------
def test_importing_methods_imports_no_method_package():
  code = ('import wsss_jax.methods, sys; print([m for m in sys.modules '
          "if m.startswith('wsss_jax.methods.')])")
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True,
                       capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=REPO))
  assert out.stdout.strip() == '[]', out.stdout + out.stderr
