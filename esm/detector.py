"""The Python API: a trained workdir as a detector.

    from esm import Detector
    det = Detector.load(workdir)          # newest checkpoint's EMA parameters + DIR/detector.json
    res = det.predict(images)             # HxW / HxWxC uint8 arrays or image file paths
    res.scores, res.decisions, res.maps   # (N,), (N,) bool, float32 maps at each input's size

The config comes from the workdir (config.json with detector.json's fields applied), so no
ConfigDict, grain or TFDS is needed by the caller. Scores depend on each image alone (content-keyed
noise, esm/sampling.py), not on the other images or the batch size.
"""

import dataclasses
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import jax
import numpy as np
from absl import logging
from PIL import Image

from datasets import folder
from esm import baselines
from esm import config as config_lib
from esm import detector_state
from esm import detectors as det
from esm import preprocess
from esm.errors import UserError
from esm.image_set import ImageSet
from esm.scoring import Scorer

ImageInput = Union[str, os.PathLike, np.ndarray]


@dataclasses.dataclass
class Prediction:
  """Results of Detector.predict, one entry per input, in input order."""
  scores: np.ndarray  # (N,) float32 image scores (eq. 15, or detect.image_score's)
  decisions: np.ndarray  # (N,) bool: score > the saved image threshold (True = defect)
  maps: List[np.ndarray]  # float32 anomaly maps (eq. 14, blurred), each at its input's size
  masks: List[np.ndarray]  # bool maps: map > the saved pixel threshold
  model_maps: np.ndarray  # (N, S, S) float32 maps at model resolution
  # (N,) image score of each model-free baseline fitted in the workdir (esm/baselines.py): higher
  # is more anomalous, on the baseline's own scale (no threshold)
  baseline_scores: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def to_rgb(image: ImageInput) -> np.ndarray:
  """uint8 HxWx3 from a file path or an HxW / HxWx1 / HxWx3 / HxWx4 uint8 array (alpha dropped)."""
  if isinstance(image, (str, os.PathLike)):
    return folder.read_image(os.fspath(image))
  a = np.asarray(image)
  if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
    raise UserError(f'image of dtype {a.dtype} and shape {a.shape}: expected uint8 HxW, HxWx1, '
                    'HxWx3 or HxWx4')
  if a.ndim == 3 and a.shape[2] == 1:
    a = a[..., 0]
  return folder.image_to_rgb(Image.fromarray(a))


def resize_map(m: np.ndarray, height: int, width: int) -> np.ndarray:
  """A float32 map resized (bilinear) to height x width."""
  if m.shape == (height, width):
    return m.astype(np.float32)
  return np.asarray(Image.fromarray(m.astype(np.float32), 'F').resize(
      (width, height), Image.Resampling.BILINEAR), np.float32)


class Detector:
  """A trained workdir's scorer with its saved normalisation and thresholds."""

  def __init__(self, scorer, state: Dict[str, Any], workdir: str):
    self.scorer, self.state, self.workdir = scorer, state, workdir
    self.config = scorer.config
    self.baselines = baselines.load_fitted(self.config, workdir)
    self._baseline_context = None  # built at the first predict (the kNN baseline loads a ViT)
    self.image_size = scorer.image_size
    self.image_threshold = float(state['image_threshold'])
    self.pixel_threshold = float(state['pixel_threshold'])

  @classmethod
  def load(cls, workdir: str, batch_size: Optional[int] = None) -> 'Detector':
    """The detector of workdir: its newest checkpoint, config.json and detector.json. batch_size
    (default the workdir's eval.batch_size) changes speed and memory only, never a score."""
    state = detector_state.load_state(workdir)
    config = detector_state.saved_config(workdir, state)
    batch = config.eval.batch_size if batch_size is None else int(batch_size)
    if batch < 1 or batch % jax.device_count():
      raise UserError(f'batch_size: {batch} must be a positive multiple of the '
                      f'{jax.device_count()} devices')
    config = config_lib.with_fields(config, {'eval.batch_size': batch})
    scorer = Scorer(config, workdir)
    if scorer.checkpoint_step != state['checkpoint_step']:
      raise UserError(f'{detector_state.state_path(workdir)} belongs to checkpoint step '
                      f'{state["checkpoint_step"]} but the newest checkpoint is step '
                      f'{scorer.checkpoint_step}; run --mode=eval again')
    if list(scorer.selection.used) != list(state['detectors']):
      raise UserError(f'{detector_state.state_path(workdir)}: saved detectors {state["detectors"]}, '
                      f'but this checkpoint and config give {list(scorer.selection.used)}')
    scorer.stats = det.NormStats.from_dict(state['normalisation'])
    logging.info('detector: %s, T_d=%d, detectors %s, checkpoint step %d, image threshold %.4g',
                 scorer.recon.method, scorer.recon.t_d, '+'.join(scorer.selection.used),
                 scorer.checkpoint_step, state['image_threshold'])
    return cls(scorer, state, workdir)

  def predict(self, images: Sequence[ImageInput], names: Optional[Sequence[str]] = None) -> Prediction:
    """Scores images (arrays or paths); names label them in the log only."""
    rgbs = [to_rgb(x) for x in images]
    if not rgbs:
      raise UserError('Detector.predict: no images given')
    size = self.image_size
    inputs = [preprocess.to_float(folder.resize_rgb(r, size)) for r in rgbs]
    names = list(names) if names is not None else [f'image {k}' for k in range(len(rgbs))]
    records = [{'filename': n, 'defect_type': '', 'label': -1} for n in names]

    def load(i: int) -> Dict[str, np.ndarray]:
      return {'image': inputs[i], 'mask': np.zeros((size, size), np.uint8), 'label': np.int32(-1)}

    data = ImageSet(len(inputs), False, records, size, self.config.eval.batch_size, load)
    out = self.scorer.run_split(data, what='predict')
    pixel, scores = self.scorer.score(self.scorer.normalise(out.maps))
    maps = [resize_map(pixel[k], *rgbs[k].shape[:2]) for k in range(len(rgbs))]
    return Prediction(scores.astype(np.float32), scores > self.image_threshold, maps,
                      [m > self.pixel_threshold for m in maps], pixel, self._baseline_scores(data))

  def _baseline_scores(self, data: ImageSet) -> Dict[str, np.ndarray]:
    if self.baselines and self._baseline_context is None:
      self._baseline_context = baselines.make_context(self.config, list(self.baselines))
    return {name: baselines.score_image_set(name, state, data, self._baseline_context)[1]
            for name, state in self.baselines.items()}
