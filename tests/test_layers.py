"""The layering of the library: no import circle, no upward import, light entry points."""

import ast
import os
import pathlib
import subprocess
import sys

from esm import modes
from esm import run

REPO = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = ('esm', 'datasets')
ABOVE_THE_LIBRARY = ('configs', 'experiments', 'bench', 'tests', 'main')


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix('').parts)
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: pathlib.Path, known) -> set:
  """The project modules `path` imports at module level or inside functions."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names.update(f'{node.module}.{a.name}' for a in node.names)
  return {n for n in names if n in known or n.split('.')[0] in ABOVE_THE_LIBRARY}


def _graph():
  paths = [p for top in LIBRARY for p in (REPO / top).rglob('*.py')]
  known = {_module_name(p) for p in paths}
  return {_module_name(p): _imports(p, known) - {_module_name(p)} for p in paths}


def test_the_library_never_imports_configs_experiments_or_bench():
  upward = {m: sorted(i for i in deps if i.split('.')[0] in ABOVE_THE_LIBRARY)
            for m, deps in _graph().items()}
  assert not {m: i for m, i in upward.items() if i}


def test_the_modes_never_import_each_other():
  graph = _graph()
  mode_modules = {fn.__module__ for fn in run.MODES.values()}
  crossing = {m: sorted(d for d in graph[m] if d in mode_modules) for m in mode_modules}
  assert not {m: d for m, d in crossing.items() if d}


def test_no_import_circle():
  graph = {m: {d for d in deps if d in _graph_keys()} for m, deps in _graph().items()}
  # A package's __init__ re-exporting its modules is not a circle through the package itself.
  for m in graph:
    graph[m] = {d for d in graph[m] if not m.startswith(d + '.')}
  state, cycle = {}, []

  def visit(m, stack):
    state[m] = 'open'
    for d in sorted(graph[m]):
      if state.get(d) == 'open':
        cycle.append(stack[stack.index(d):] + [d])
      elif d not in state:
        visit(d, stack + [d])
    state[m] = 'done'

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  assert not cycle, cycle


def _graph_keys():
  return {_module_name(p) for top in LIBRARY for p in (REPO / top).rglob('*.py')}


def _modules_loaded_by(code: str) -> set:
  out = subprocess.run([sys.executable, '-c', code + '\nimport sys\nprint(" ".join(sys.modules))'],
                       cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                       text=True, timeout=300, check=True)
  return {m.split('.')[0] for m in out.stdout.split()}


def test_the_python_api_loads_no_dataset_code():
  loaded = _modules_loaded_by('from esm import Detector\nDetector.load')
  assert not loaded & {'tensorflow_datasets', 'grain', 'tensorflow'}, loaded


def test_validation_loads_no_dataset_or_checkpoint_code():
  loaded = _modules_loaded_by('import esm.validate')
  assert not loaded & {'tensorflow_datasets', 'grain', 'orbax', 'tensorflow'}, loaded


def test_every_mode_name_runs_something():
  assert set(run.MODES) == set(modes.MODE_NAMES) - {'train_eval'}
