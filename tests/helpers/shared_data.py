"""The real data under ../shared/data (or $ESM_SHARED_DATA), for the tests that read it."""

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SHARED_DATA = pathlib.Path(os.environ.get('ESM_SHARED_DATA', REPO.parent / 'shared' / 'data'))


def shared_data_dir(*parts) -> pathlib.Path:
  """Path under the shared data folder, or skip the test when that folder is absent."""
  path = SHARED_DATA.joinpath(*parts)
  if not path.exists():
    pytest.skip(f'real data not present at {path}')
  return path
