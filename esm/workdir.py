"""A workdir's config.json: written once the checks pass, read back with renamed fields mapped."""

import json
import os
from typing import Optional

import jax
from absl import logging

from esm import files

# Fields renamed since workdirs were first written: old dotted name -> new dotted name.
RENAMED_FIELDS = {
    'sampling.batch_size': 'eval.batch_size',
    'sampling.min_var': 'sampling.sigma_min_var',
    'sampling.max_var': 'sampling.sigma_max_var',
}


def config_path(workdir: str) -> str:
  return os.path.join(workdir, 'config.json')


def save_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    files.write_text(config_path(workdir), config.to_json_best_effort(indent=2))


def upgrade_saved_config(saved: dict, source: str = 'config.json') -> dict:
  """Moves renamed fields of a saved config dict to their new names, one warning line each."""
  saved = json.loads(json.dumps(saved))  # a deep copy
  for old, new in RENAMED_FIELDS.items():
    old_section, old_field = old.split('.')
    if old_field not in saved.get(old_section, {}):
      continue
    value = saved[old_section].pop(old_field)
    new_section, new_field = new.split('.')
    saved.setdefault(new_section, {}).setdefault(new_field, value)
    logging.warning('%s: %s is deprecated, read as %s', source, old, new)
  return saved


def load_saved_config(workdir: str) -> Optional[dict]:
  """The workdir's config.json as a dict with current field names, or None when there is none."""
  path = config_path(workdir)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return upgrade_saved_config(json.load(f), path)
