"""esm/host_memory.py: glibc's malloc settings are taken on Linux with glibc, skipped elsewhere.

What they do to page faults depends on the machine (glibc, transparent huge pages):
bench/host_memory.py measures and checks it."""

import os
import subprocess
import sys

import pytest

from esm import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _glibc() -> bool:
  return sys.platform.startswith('linux') and 'glibc' in (os.confstr('CS_GNU_LIBC_VERSION') or '')


def test_glibc_takes_the_settings():
  if not _glibc():
    pytest.skip('glibc only')
  # In a fresh process: this one's malloc stays as the other tests found it.
  out = subprocess.run([sys.executable, '-c',
                        'from esm import host_memory; print(host_memory.reuse_freed_memory())'],
                       cwd=REPO, capture_output=True, text=True, check=True)
  assert out.stdout.split() == ['True'], out.stderr[-2000:]


def test_reuse_freed_memory_is_a_no_op_off_linux(monkeypatch):
  monkeypatch.setattr(sys, 'platform', 'darwin')
  assert host_memory.reuse_freed_memory() is False
