"""Shared pytest setup: XLA flags for tiny models and one compilation cache per session."""

import os

# Tests use tiny models whose run time is dominated by XLA compilation on CPU: the lowest backend
# optimisation level compiles about twice as fast. Set before jax is imported by any test module.
os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), '--xla_backend_optimization_level=0']).strip()

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='session', autouse=True)
def jax_compilation_cache(tmp_path_factory):
  """One persistent XLA cache for the session, shared by the pytest-xdist workers (whose temporary
  folders sit side by side) and the subprocesses: a program compiles once per session."""
  import jax  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent
  path = str(base / 'xla_cache')
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = path
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  yield path
