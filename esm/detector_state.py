"""DIR/detector.json: everything inference needs besides the checkpoint; its one writer and reader.

Evaluation, tuning and predict's refit write it (`fit_and_save`); predict, the Python API
(esm.detector.Detector) and export read it and never recompute the
normalisation or the thresholds from the current flags. It holds the preprocessing, the sampler and
its T_d (after DIR/tuned.json was applied), the detector weights, blur and N_a, the feature
extractor's identity, the normalisation statistics of the held-out train/good images, the image
threshold (percentile detect.threshold_percentile of the held-out good images' scores) and the pixel
threshold (the same percentile over every held-out good pixel of the combined map), the checkpoint
step and the project version. The normalisation holds, besides each raw map's pixel mean and std,
each detector's held-out image-score mean and std that detect.image_score='standardised_mean'
reads.
"""

import json
import os
from typing import Any, Dict, List, Optional

import jax
import numpy as np

import esm
from esm import config as config_lib
from esm import files
from esm import validate
from esm import workdir as workdir_lib
from esm.config import Config, get_field, plain
from esm.errors import UserError
from esm.scoring import Scorer, SplitOutputs

STATE_FILE = 'detector.json'
PREPROCESSING = ('RGB (grey repeated, alpha dropped), resized to image_size x image_size with an '
                 'antialiasing bilinear filter, scaled to [-1, 1] as x * 2/255 - 1')
# Config fields inference depends on; a current flag that differs from the saved value is refused.
SAVED_FIELDS = (
    'seed', 'data.dataset', 'data.category', 'data.image_size',
    'sampling.method', 'sampling.t_d', 'sampling.esm_min_var', 'sampling.sigma_min_var',
    'sampling.sigma_max_var', 'sampling.sigma_time', 'sampling.sigma_floor', 'sampling.var_source',
    'detect.weights', 'detect.blur_sigma', 'detect.top_n', 'detect.re_kind', 'detect.var_floor',
    'detect.threshold_percentile', 'detect.image_detectors', 'detect.image_score')
FEATURE_FIELDS = ('features.model', 'features.weights', 'features.layers', 'features.image_size',
                  'features.norm')


def state_path(workdir: str) -> str:
  return os.path.join(workdir, STATE_FILE)


def build_state(config: Config, scorer: Scorer, val_pixel_maps: np.ndarray,
                val_scores: np.ndarray) -> Dict[str, Any]:
  """The saved state of a scorer whose normalisation was fitted on the held-out good images, whose
  combined maps and image scores are val_pixel_maps [N,H,W] and val_scores [N]."""
  pct = float(config.detect.threshold_percentile)
  uses_features = any(name == 'cos' for name in scorer.selection.used)
  median = float(np.median(val_pixel_maps))
  pixel_threshold = float(np.percentile(val_pixel_maps, pct))
  return {
      'version': esm.__version__,
      'checkpoint_step': int(scorer.checkpoint_step),
      'preprocessing': PREPROCESSING,
      'fields': {f: plain(get_field(config, f))
                 for f in SAVED_FIELDS + (FEATURE_FIELDS if uses_features else ())},
      'method': scorer.recon.method, 'nfe': int(scorer.recon.nfe),
      'detectors': list(scorer.selection.used),
      'normalisation': scorer.stats.to_dict(),
      'held_out_images': int(len(val_scores)),
      'threshold_percentile': pct,
      'image_threshold': float(np.percentile(val_scores, pct)),
      'pixel_threshold': pixel_threshold,
      # Overlay colour scale: held-out median at the bottom, the pixel threshold at its middle.
      'map_colour_range': [median, median + 2.0 * max(pixel_threshold - median, 1e-6)],
  }


def load_state(workdir: str) -> Dict[str, Any]:
  """DIR/detector.json, or a one-line UserError saying how to make it."""
  path = state_path(workdir)
  if not os.path.exists(path):
    raise UserError(f'{path}: no saved detector state; run --mode=eval on this workdir first (it '
                    'fits the normalisation and the thresholds on the held-out good images)')
  with open(path) as f:
    return json.load(f)


def differences(state: Dict[str, Any], config: Config) -> List[str]:
  """'field: saved X, given Y' for every saved field that the current config contradicts."""
  out = []
  for field, saved in state['fields'].items():
    given = plain(get_field(config, field))
    if given != saved:
      out.append(f'{field} (saved {saved!r}, given {given!r})')
  return out


def check_config_matches(state: Dict[str, Any], config: Config, workdir: str) -> None:
  """A one-line UserError naming every field where the flags contradict DIR/detector.json."""
  diffs = differences(state, config)
  if diffs:
    raise UserError(f'{state_path(workdir)}: the config contradicts the saved detector state: '
                    f'{"; ".join(diffs)} (DIR/tuned.json counts as flags); drop those flags, run '
                    '--mode=eval again, or add --config.predict.refit=True to re-fit the '
                    'normalisation and thresholds with them')


def load_checked(config: Config, workdir: str) -> Dict[str, Any]:
  """DIR/detector.json, refusing a config whose model or saved fields contradict the workdir's."""
  validate.check_checkpoint_compatible(workdir_lib.load_saved_config(workdir), config, workdir)
  state = load_state(workdir)
  check_config_matches(state, config, workdir)
  return state


def fit_and_save(config: Config, workdir: str, scorer: Scorer,
                 val_out: SplitOutputs) -> Dict[str, Any]:
  """The state of a scorer whose normalisation was fitted on the held-out good images (val_out,
  their outputs), written to DIR/detector.json by process 0; evaluation, tuning and predict's
  refit call it."""
  val_pixel_maps, val_scores = scorer.score(scorer.normalise(val_out.maps))
  state = build_state(config, scorer, val_pixel_maps, val_scores)
  if jax.process_index() == 0:
    files.write_text(state_path(workdir), json.dumps(state, indent=1))
  return state


def saved_config(workdir: str, state: Optional[Dict[str, Any]] = None) -> Config:
  """The workdir's config (config.json) with the saved state's fields applied."""
  saved = workdir_lib.load_saved_config(workdir)
  if saved is None:
    raise UserError(f'{workdir}: no config.json; train a model there first (--mode=train)')
  config = config_lib.from_dict(saved)
  if state is not None:
    config = config_lib.with_fields(config, state['fields'])
  return config
