"""Configs of test runs: configs/test.py with a test's changes and its own data folders."""

import os
from typing import Any, Mapping, Optional

from configs import common
import configs.test


def config(variant: str, cache: Optional[str] = None, changes: Optional[Mapping[str, Any]] = None):
  """configs/test.py:<variant> with dotted `changes`; with `cache`, the synthetic set and its TFDS
  files go under that folder (a test's temporary folder) rather than the user's cache."""
  c = common.override(configs.test.get_config(variant), dict(changes or {}))
  if cache is not None:
    c.data.root = os.path.join(cache, 'synthetic')
    c.data.tfds_dir = os.path.join(cache, 'tfds')
  return c
