"""--mode=predict: a thin loop over esm.detector.Detector, writing what a person can read.

Per image: an overlay of the anomaly map on the input at the input's own size, on the fixed colour
scale saved in DIR/detector.json (so colours compare across images and runs) with a colour bar, and
a binary mask from the saved pixel threshold; scores.csv with each decision, and the image score
of each model-free baseline fitted beside the model (a `<name>_score` column: esm/baselines.py,
higher is more anomalous, no threshold). Output goes to
--output, by default a new folder DIR/predict/run_NNN per run (never the last one's).
"""

import os
from typing import List, Optional, Sequence, Tuple

import jax
import numpy as np
from absl import logging
from PIL import Image

from datasets import folder
from esm import detector_state
from esm import plotting
from esm import report
from esm.config import Config
from esm.detector import Detector, to_rgb
from esm.errors import UserError


def list_inputs(input_dir: Optional[str]) -> Tuple[List[str], List[str]]:
  """(image file names, skipped non-image names) of a folder; hidden files and sub-folders are
  ignored, every image is checked to parse (before any model is built)."""
  if not input_dir:
    raise UserError('--input: predict needs a folder of images (--input=FOLDER)')
  if not os.path.isdir(input_dir):
    raise UserError(f'{input_dir}: folder not found; expected a folder of images')
  names, skipped = [], []
  for name in sorted(os.listdir(input_dir)):
    path = os.path.join(input_dir, name)
    if name.startswith('.') or os.path.isdir(path):
      continue
    (names if name.lower().endswith(folder.IMAGE_EXTENSIONS) else skipped).append(name)
  if skipped:
    logging.warning('predict: skipping %d non-image files in %s: %s', len(skipped), input_dir,
                    ', '.join(skipped))
  if not names:
    raise UserError(f'{input_dir}: no images found; expected PNG/JPEG/BMP/TIFF files')
  for name in names:
    folder.check_image_file(os.path.join(input_dir, name))
  return names, skipped


def new_output_dir(workdir: str) -> str:
  """DIR/predict/run_NNN, the first number not yet used."""
  base = os.path.join(workdir, 'predict')
  os.makedirs(base, exist_ok=True)
  k = 1
  while True:
    path = os.path.join(base, f'run_{k:03d}')
    try:
      os.mkdir(path)  # atomic: two concurrent runs never share a folder
      return path
    except FileExistsError:
      k += 1


def overlay(rgb: np.ndarray, amap: np.ndarray, lo: float, hi: float) -> Image.Image:
  """The map's colours blended (half) over the input at the input's size, with a colour bar of
  lo..hi beside it."""
  colours = plotting.heatmap(np.clip(amap, lo, hi), lo, hi).astype(np.float32)
  blend = (0.5 * rgb.astype(np.float32) + 0.5 * colours).astype(np.uint8)
  return plotting.to_image(plotting.image_row([blend], colour_ranges=[(lo, hi)]))


def write_outputs(out_dir: str, names: Sequence[str], rgbs, result, state) -> None:
  """overlays/, masks/ and scores.csv (file, score, threshold, decision)."""
  lo, hi = state['map_colour_range']
  for sub in ('overlays', 'masks'):
    os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
  for k, name in enumerate(names):
    stem = os.path.splitext(name)[0].replace(os.sep, '__')
    overlay(rgbs[k], result.maps[k], lo, hi).save(os.path.join(out_dir, 'overlays', f'{stem}.png'))
    Image.fromarray(result.masks[k].astype(np.uint8) * 255).save(
        os.path.join(out_dir, 'masks', f'{stem}.png'))
  threshold = state['image_threshold']
  extra = sorted(result.baseline_scores)
  report.write_csv(os.path.join(out_dir, 'scores.csv'),
                   ['filename', 'score', 'threshold', 'decision'] + [f'{b}_score' for b in extra],
                   [[n, f'{result.scores[k]:.8g}', f'{threshold:.8g}',
                     'defect' if result.decisions[k] else 'good'] +
                    [f'{result.baseline_scores[b][k]:.8g}' for b in extra]
                    for k, n in enumerate(names)])
  logging.info('predict: %d images, %d defects (image threshold %.4g = percentile %.1f of held-out '
               'good scores); results in %s', len(names), int(result.decisions.sum()), threshold,
               state['threshold_percentile'], out_dir)


def predict(config: Config, workdir: str):
  """--mode=predict: scores config.predict.input_dir with the saved detector; returns the
  Prediction and the output folder (None on processes other than 0)."""
  input_dir = config.predict.input_dir
  names, _ = list_inputs(input_dir)
  state = detector_state.load_checked(config, workdir)
  detector = Detector.load(workdir, batch_size=config.eval.batch_size)
  paths = [os.path.join(input_dir, n) for n in names]
  rgbs = [to_rgb(p) for p in paths]
  result = detector.predict(rgbs, names=names)
  if jax.process_index() != 0:
    return result, None
  out_dir = config.predict.output_dir or new_output_dir(workdir)
  os.makedirs(out_dir, exist_ok=True)
  write_outputs(out_dir, names, rgbs, result, state)
  return result, out_dir
