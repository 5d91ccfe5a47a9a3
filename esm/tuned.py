"""DIR/tuned.json: what label-free tuning (esm/tune.py) chose, and every candidate it scored;
DIR/tuning_scores.npz: every candidate's per-image development scores; and DIR/tune_progress/:
each candidate point's scores as it finishes, so an interrupted tuning resumes.

The one reader and writer of the files. Tuning writes it; the category loop (esm/run.py) applies its
choice to the config of the modes that score images; evaluation reads the candidates for the
report's sweep; a candidate becomes a config in one place (`candidate_config`).
"""

import hashlib
import json
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np

from esm import config as config_lib
from esm import files

TUNED_FILE = 'tuned.json'
SCORES_FILE = 'tuning_scores.npz'
PROGRESS_DIR = 'tune_progress'
# Key of tuned.json -> the config field it sets.
TUNED_FIELDS = {'t_d': 'sampling.t_d', 'method': 'sampling.method', 'weights': 'detect.weights',
                'sigma_floor': 'sampling.sigma_floor'}


def path(workdir: str) -> str:
  return os.path.join(workdir, TUNED_FILE)


def load(workdir: str) -> Optional[Dict[str, Any]]:
  """DIR/tuned.json, or None when the workdir was never tuned."""
  if not os.path.exists(path(workdir)):
    return None
  with open(path(workdir)) as f:
    return json.load(f)


def write(workdir: str, tuned: Dict[str, Any]) -> None:
  if jax.process_index() == 0:
    files.write_text(path(workdir), json.dumps(tuned, indent=1))


def write_scores(workdir: str, dev, evidence: Dict[str, np.ndarray]) -> None:
  """DIR/tuning_scores.npz: per candidate (rows in tuned.json's order) its image scores [C, N]
  and its pixel pairs (esm/resample.py: wins [C, N, N], pos and neg [C, N]), with the set's
  labels, source images, families and strengths [N]: what the choice's bootstrap resampled."""
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, SCORES_FILE), 'wb') as f:
    np.savez_compressed(f, **evidence, labels=dev.labels, source=dev.source,
                        families=np.asarray(dev.families, str), strengths=dev.strengths)


def load_scores(workdir: str) -> Optional[Dict[str, np.ndarray]]:
  """DIR/tuning_scores.npz as arrays, or None when absent."""
  p = os.path.join(workdir, SCORES_FILE)
  if not os.path.exists(p):
    return None
  with np.load(p) as z:
    return {k: z[k] for k in z.files}


def progress_base(params, dev_arrays) -> Optional[str]:
  """A digest of what every candidate point's scores depend on besides its config: the restored
  parameters and the development set's arrays. None in a multi-host run: its processes score every
  point together, so none may skip one."""
  if jax.process_count() > 1:
    return None
  h = hashlib.sha256()
  for a in list(jax.tree.leaves(params)) + list(dev_arrays):
    a = np.ascontiguousarray(np.asarray(a))
    h.update(f'{a.dtype}{a.shape}'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


# Fields that say where files live, how fast they are read or what another mode does: no point's
# scores depend on them (the development arrays' digest covers what was loaded), so a tuning
# resumed with the data folder named another way reads its finished points back.
_OUTSIDE_PROGRESS_KEY = ('compilation_cache_dir', 'command_line', 'data.root', 'data.tfds_dir',
                         'data.num_workers', 'data.cache_mb', 'predict')


def progress_key(base: Optional[str], candidate: config_lib.Config, stage: int) -> Optional[str]:
  """The name of one candidate point's saved scores (None: not saved)."""
  if base is None:
    return None
  fields = config_lib.to_dict(candidate)
  for dotted in _OUTSIDE_PROGRESS_KEY:
    *section, name = dotted.split('.')
    (fields[section[0]] if section else fields).pop(name)
  blob = json.dumps([base, fields, stage], sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _progress_path(workdir: str, key: str) -> str:
  return os.path.join(workdir, PROGRESS_DIR, key + '.npz')


def save_progress(workdir: str, key: Optional[str], rows: List[Dict[str, Any]],
                  evidence: Dict[str, np.ndarray]) -> None:
  """One candidate point's rows (tuned.json's candidates) and their stacked per-image evidence
  (image_scores, wins, pos, neg: esm/dev_set.py evidence_arrays)."""
  if key is None or jax.process_index() != 0:
    return
  os.makedirs(os.path.join(workdir, PROGRESS_DIR), exist_ok=True)
  tmp = _progress_path(workdir, key) + '.tmp'
  with open(tmp, 'wb') as f:
    np.savez(f, rows=json.dumps(rows), **evidence)
  os.replace(tmp, _progress_path(workdir, key))


def load_progress(workdir: str,
                  key: Optional[str]) -> Optional[Tuple[List[Dict[str, Any]], Dict[str, Any]]]:
  """(rows, {image_scores, wins, pos, neg}) saved under key, or None."""
  if key is None or not os.path.exists(_progress_path(workdir, key)):
    return None
  with np.load(_progress_path(workdir, key)) as z:
    return json.loads(str(z['rows'])), {k: z[k] for k in ('image_scores', 'wins', 'pos', 'neg')}


def clear_progress(workdir: str) -> None:
  if jax.process_index() == 0:
    shutil.rmtree(os.path.join(workdir, PROGRESS_DIR), ignore_errors=True)


def candidate_config(config: config_lib.Config, candidate: Dict[str, Any]) -> config_lib.Config:
  """config with the sampler, T_d, detector weights and (where the sampler reads it) ESM^σ's floor
  of a tuning candidate (a row of tuned.json's candidates)."""
  return config_lib.with_fields(config, {
      'sampling.method': candidate['method'], 'sampling.t_d': candidate['t_d'],
      'detect.weights': tuple(candidate['weights']),
      'sampling.sigma_floor': candidate.get('sigma_floor', config.sampling.sigma_floor)})


def apply(config: config_lib.Config, workdir: str) -> config_lib.Config:
  """config with DIR/tuned.json's choice, except the fields given on the command line."""
  tuned = load(workdir)
  if tuned is None:
    return config
  changes = {field: tuned[key] for key, field in TUNED_FIELDS.items()
             if key in tuned and field not in config.command_line}
  return config_lib.with_fields(config, changes)


def settings_source(config: config_lib.Config, workdir: str) -> Dict[str, str]:
  """Where sampling.t_d, sampling.method, detect.weights and (when tuning chose it) ESM^σ's floor
  come from: 'command line', 'tuned', 'paper table' or 'config'."""
  tuned = load(workdir) or {}
  sources = {}
  for key, field in TUNED_FIELDS.items():
    if field in config.command_line:
      sources[field] = 'command line'
    elif key in tuned:
      sources[field] = 'tuned'
    elif key == 'sigma_floor':
      continue  # not tuned: the config's floor, which only ESM^σ reads
    elif field == 'sampling.t_d' and config.data.category in config.sampling.t_d_by_category:
      sources[field] = 'paper table'
    else:
      sources[field] = 'config'
  return sources


def sweep_candidates(tuned: Dict[str, Any]) -> List[Dict[str, Any]]:
  """One candidate per (sampler, T_d) of the grid: the detector weights that scored best there on
  the development set, or, at each sampler's chosen T_d, the ones the choice rule took."""
  out = []
  for method in tuned['methods']:
    chosen = tuned['by_method'].get(method, {})
    for t_d in tuned['t_d_grid']:
      mine = [c for c in tuned['candidates'] if c['method'] == method and c['t_d'] == t_d]
      best = max(mine, key=lambda c: c['score'])
      if chosen.get('t_d') == t_d:
        best = next(c for c in mine if c['weights'] == chosen['weights']
                    and c.get('sigma_floor') == chosen.get('sigma_floor'))
      out.append(best)
  return out
