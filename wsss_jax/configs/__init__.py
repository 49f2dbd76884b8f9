"""The configs of every method: `get_config(arg)` files for `--config`.

They ship with the package, so `--config=box2seg[:variant]` works after any
install; a checkout's `configs/<name>.py` are one-line shims of these for the
`--config=configs/<name>.py` spelling.  Copy one next to your work to edit it.
"""

import os

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def available() -> list[str]:
  """The packaged config names."""
  return sorted(name[:-3] for name in os.listdir(CONFIG_DIR)
                if name.endswith('.py') and not name.startswith('_'))


def path_of(name: str) -> str:
  """The packaged config file of `name` ('box2seg')."""
  if name not in available():
    raise ValueError(f'No packaged config {name!r}; choose one of '
                     f'{available()} or give a path to a config file.')
  return os.path.join(CONFIG_DIR, f'{name}.py')
