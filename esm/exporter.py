"""--mode=export: the whole scoring function of a workdir's saved detector as a serialised
jax.export artifact in DIR/export/, which esm.export.load reads back with jax and numpy alone."""

import json
import os

import jax
import jax.numpy as jnp

from esm import detector_state
from esm import detectors as det
from esm import files
from esm import sampling
from esm.config import Config
from esm.detector import Detector
from esm.export import ARTIFACT, CONTRACT


def export(config: Config, workdir: str) -> str:
  """--mode=export: DIR/export/ at eval.batch_size, after checking the flags against the saved
  detector state; returns the folder."""
  detector_state.load_checked(config, workdir)
  return export_detector(workdir, config.eval.batch_size)


def export_detector(workdir: str, batch_size: int, out_dir: str = '') -> str:
  """Writes workdir/export/ (or out_dir) from the workdir's saved detector; returns the folder."""
  detector = Detector.load(workdir, batch_size=batch_size)
  scorer, size = detector.scorer, detector.image_size
  score_fn = det.get_score_fn(scorer.detect_cfg, size, scorer.selection.used, scorer.stats)
  params, seed, stats = scorer.params, scorer.config.seed, scorer.stats

  def scoring(images_u8, digests):
    x = images_u8.astype(jnp.float32) * jnp.float32(2.0 / 255.0) - jnp.float32(1.0)
    keys = jax.random.key_data(sampling.image_keys(seed, digests))
    _, raw = scorer.analyse_fn(params, x, keys)
    pixel, image = score_fn(det.normalise(raw, stats))
    return image, pixel

  specs = (jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8),
           jax.ShapeDtypeStruct((batch_size,), jnp.uint32))
  exported = jax.export.export(jax.jit(scoring))(*specs)
  out_dir = out_dir or os.path.join(workdir, 'export')
  os.makedirs(out_dir, exist_ok=True)
  with files.atomic_path(os.path.join(out_dir, ARTIFACT)) as tmp:
    with open(tmp, 'wb') as f:
      f.write(exported.serialize())
  state = detector.state
  contract = {
      'artifact': ARTIFACT, 'batch_size': batch_size, 'image_size': size,
      'input': f'uint8 [N, {size}, {size}, 3] RGB, already resized to {size}x{size} '
               '(antialiasing bilinear); any N (padded to batch_size)',
      'outputs': {'scores': f'float32 [N] image scores (detect.image_score='
                            f'{scorer.detect_cfg.image_score!r})',
                  'maps': f'float32 [N, {size}, {size}] combined anomaly maps (eq. 14, blurred)'},
      'noise_digest': 'blake2b (4 bytes, little endian) of the float32 preprocessed pixels',
      'image_threshold': state['image_threshold'], 'pixel_threshold': state['pixel_threshold'],
      'map_colour_range': state['map_colour_range'], 'checkpoint_step': state['checkpoint_step'],
      'version': state['version'], 'platforms': list(exported.platforms),
  }
  files.write_text(os.path.join(out_dir, CONTRACT), json.dumps(contract, indent=1))
  return out_dir
