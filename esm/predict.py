"""--mode=predict: a thin loop over esm.detector.Detector, writing what a person can read.

Per image: an overlay of the anomaly map on the input at the input's own size, on the fixed colour
scale saved in DIR/detector.json (so colours compare across images and runs) with a colour bar, and
a binary mask from the saved pixel threshold; scores.csv with each decision. Output goes to
--output, by default a new folder DIR/predict/run_NNN per run (never the last one's).
"""

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
from absl import logging
from PIL import Image

from esm import detector_state
from esm import plotting
from esm.errors import UserError


def list_inputs(input_dir: Optional[str]) -> Tuple[List[str], List[str]]:
  """(image file names, skipped non-image names) of a folder; hidden files and sub-folders are
  ignored, every image is checked to parse (before any model is built)."""
  from datasets import folder  # pylint: disable=g-import-not-at-top
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
  from esm import report  # pylint: disable=g-import-not-at-top
  lo, hi = state['map_colour_range']
  for sub in ('overlays', 'masks'):
    os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
  for k, name in enumerate(names):
    stem = os.path.splitext(name)[0].replace(os.sep, '__')
    overlay(rgbs[k], result.maps[k], lo, hi).save(os.path.join(out_dir, 'overlays', f'{stem}.png'))
    Image.fromarray(result.masks[k].astype(np.uint8) * 255).save(
        os.path.join(out_dir, 'masks', f'{stem}.png'))
  threshold = state['image_threshold']
  report.write_csv(os.path.join(out_dir, 'scores.csv'), ['filename', 'score', 'threshold', 'decision'],
                   [[n, f'{result.scores[k]:.8g}', f'{threshold:.8g}',
                     'defect' if result.decisions[k] else 'good'] for k, n in enumerate(names)])
  logging.info('predict: %d images, %d defects (image threshold %.4g = percentile %.1f of held-out '
               'good scores); results in %s', len(names), int(result.decisions.sum()), threshold,
               state['threshold_percentile'], out_dir)


def checked_state(config, workdir: str):
  """DIR/detector.json after predict.refit (if asked), refusing flags that contradict it."""
  # pylint: disable=g-import-not-at-top
  from esm import validate
  from esm import workdir as workdir_lib
  # pylint: enable=g-import-not-at-top
  validate.check_checkpoint_compatible(workdir_lib.load_saved_config(workdir), config, workdir)
  if config.predict.refit:
    logging.warning('predict.refit: re-fitting the normalisation and thresholds of %s on the '
                    'held-out images of %s/%s', workdir, config.data.dataset, config.data.category)
    state = detector_state.fit_state(config, workdir)
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_index() == 0:
      detector_state.save_state(workdir, state)
  state = detector_state.load_state(workdir)
  detector_state.check_config_matches(state, config, workdir)
  return state


def predict(config, workdir: str, input_dir: Optional[str], output_dir: Optional[str] = None):
  """Scores a folder with the saved detector; returns the Prediction and the output folder."""
  import jax  # pylint: disable=g-import-not-at-top
  from esm.detector import Detector, to_rgb  # pylint: disable=g-import-not-at-top
  names, _ = list_inputs(input_dir)
  state = checked_state(config, workdir)
  detector = Detector.load(workdir, batch_size=config.eval.batch_size)
  paths = [os.path.join(input_dir, n) for n in names]
  rgbs = [to_rgb(p) for p in paths]
  result = detector.predict(rgbs, names=names)
  if jax.process_index() != 0:
    return result, None
  out_dir = output_dir or new_output_dir(workdir)
  os.makedirs(out_dir, exist_ok=True)
  write_outputs(out_dir, names, rgbs, result, state)
  return result, out_dir
