"""Shared pytest setup: the real-data location and a marker for tests that need it."""

import os
import pathlib

# Tests use tiny models whose run time is dominated by XLA compilation on CPU: the lowest backend
# optimisation level compiles about twice as fast. Set before jax is imported by any test module.
os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), '--xla_backend_optimization_level=0']).strip()

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get('ESM_SHARED_DATA', REPO.parent / 'shared' / 'data'))


def shared_data_dir(*parts) -> pathlib.Path:
  """Path under ../shared/data, or skip the test when that folder is absent."""
  path = SHARED_DATA.joinpath(*parts)
  if not path.exists():
    pytest.skip(f'real data not present at {path}')
  return path


@pytest.fixture(scope='session', autouse=True)
def jax_compilation_cache(tmp_path_factory):
  """One persistent XLA cache for the session: subprocesses reuse what this process compiled."""
  import jax  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.getbasetemp() / 'xla_cache')
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = path
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  yield path
