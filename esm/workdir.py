"""A workdir's config.json (read back with renamed fields mapped) and its trainer's lock."""

import contextlib
import json
import os
import socket
import time
from typing import Iterator, Optional

import jax
from absl import logging

from esm import files
from esm.config import Config, to_dict
from esm.errors import UserError

# Fields renamed since workdirs were first written: old dotted name -> new dotted name.
RENAMED_FIELDS = {
    'sampling.batch_size': 'eval.batch_size',
    'sampling.min_var': 'sampling.sigma_min_var',
    'sampling.max_var': 'sampling.sigma_max_var',
}
# Fields added since: dotted name -> the value that older workdirs behaved as.
ADDED_FIELDS = {
    'data.train_crop': 0,
    'predict.input_dir': '',
    'predict.output_dir': '',
    'data.min_val_images': 0,
    'tune.rule': 'legacy',
    'tune.families': ('field', 'patch', 'cutpaste', 'painted'),
    'tune.strengths': (1.0, 2.0, 4.0),
    'tune.defect_area': (0.02, 0.15),
    'tune.bootstrap': 500,
    'model.scan_streams': False,
    'model.scan_blocks': False,
    'train.compiler_options': {},
    'detect.image_score': 'map',
}


def config_path(workdir: str) -> str:
  return os.path.join(workdir, 'config.json')


def save_config(config: Config, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    files.write_text(config_path(workdir), json.dumps(to_dict(config), indent=2, sort_keys=True))


def upgrade_saved_config(saved: dict, source: str = 'config.json') -> dict:
  """Moves renamed fields of a saved config dict to their new names, one warning line each, and
  gives the fields added since it was written the values it behaved as."""
  saved = json.loads(json.dumps(saved))  # a deep copy
  for old, new in RENAMED_FIELDS.items():
    old_section, old_field = old.split('.')
    if old_field not in saved.get(old_section, {}):
      continue
    value = saved[old_section].pop(old_field)
    new_section, new_field = new.split('.')
    saved.setdefault(new_section, {}).setdefault(new_field, value)
    logging.warning('%s: %s is deprecated, read as %s', source, old, new)
  for dotted, value in ADDED_FIELDS.items():
    section, field = dotted.split('.')
    saved.setdefault(section, {}).setdefault(field, value)
  return saved


def load_saved_config(workdir: str) -> Optional[dict]:
  """The workdir's config.json as a dict with current field names, or None when there is none."""
  path = config_path(workdir)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return upgrade_saved_config(json.load(f), path)


LOCK_FILE = 'train.lock'


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


@contextlib.contextmanager
def training_lock(workdir: str) -> Iterator[None]:
  """An exclusive claim on a workdir for one trainer: DIR/train.lock, created atomically
  (O_CREAT | O_EXCL) with this host and PID. A second trainer fails at once with one line naming
  the holder; a lock whose PID is dead on this host (a killed run) is taken over with a warning.
  In a multi-process run only process 0 locks; readers (eval, predict) never do."""
  if jax.process_index() != 0:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  me = {'host': socket.gethostname(), 'pid': os.getpid(), 'since': time.strftime('%Y-%m-%d %H:%M:%S')}
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        with open(path) as f:
          holder = json.load(f)
      except (OSError, ValueError):
        holder = {}
      if holder.get('host') == me['host'] and not _pid_alive(int(holder.get('pid', -1))):
        logging.warning('%s: taking over the lock of PID %s, which is no longer running',
                        path, holder.get('pid'))
        os.remove(path)
        continue
      raise UserError(f'{workdir} is being trained by PID {holder.get("pid", "?")} on '
                      f'{holder.get("host", "?")} since {holder.get("since", "?")} ({path}); wait '
                      'for it, or remove the lock file if that run is gone')
    with os.fdopen(fd, 'w') as f:
      json.dump(me, f)
    break
  try:
    yield
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
