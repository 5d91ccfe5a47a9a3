"""Config checks that run before any compute, each failing with a one-line UserError.

Each section's own checks live with its typed reader (`X.from_config` / `__post_init__`), which
`validate_config` calls once per section; this module keeps only the checks that span sections:
T_d against the schedule, the sampler against the model, the image size against the U-Net, the
batches against the devices, and a workdir's checkpoint against the config.
"""

import json
from typing import Optional

from esm.errors import UserError

MODES = ('train', 'tune', 'eval', 'train_eval', 'predict', 'export')  # main.py's --mode
# Sections whose change makes a checkpoint unusable (parameter shapes or their meaning).
MODEL_SECTIONS = ('model', 'loss', 'sde')
MODEL_FIELDS_THAT_MAY_CHANGE = ('dropout', 'dtype')


def _expect(ok: bool, message: str) -> None:
  if not ok:
    raise UserError(message)


def validate_config(config, mode: str) -> None:
  """Everything that can be checked from the config alone, before `mode` runs."""
  # Imported here so that validating stays cheap for callers that never build a model.
  # pylint: disable=g-import-not-at-top
  from datasets.catalog import DataConfig
  from esm.detectors import DetectConfig
  from esm.losses import LossConfig
  from esm.models.dual_stream import ModelConfig
  from esm.models.unet import check_image_size
  from esm.sampling import SamplingConfig, check_t_d
  from esm.sde import SDEConfig
  from esm.train import TrainConfig
  from esm.tune import TuneConfig
  # pylint: enable=g-import-not-at-top

  _expect(mode in MODES, f'--mode: expected one of {MODES}, got {mode!r}')
  data = DataConfig.from_config(config.data)
  loss = LossConfig.from_config(config.loss)
  model = ModelConfig.from_config(config.model, dual=loss.dual_stream)
  sde = SDEConfig.from_config(config.sde)
  sampling = SamplingConfig.from_config(config.sampling)
  DetectConfig.from_config(config.detect)
  TrainConfig.from_config(config.train)
  TuneConfig.from_config(config.tune)

  check_image_size(model.unet, data.image_size)
  for t_d in [sampling.t_d] + list(dict(config.sampling.t_d_by_category).values()):
    check_t_d(t_d, sde.num_steps)
  _expect(not sampling.sampler.needs_variance or loss.dual_stream or mode == 'train',
          f"sampling.method={sampling.method!r} needs a dual-stream model (loss.kind='esm'); a DSM "
          "model supports only the samplers that do not read σ²_θ (sampling.method='sgm')")


def check_batches_split_over_devices(config) -> None:
  """The global train and eval batches must split evenly over every device of every process."""
  import jax  # pylint: disable=g-import-not-at-top
  n = jax.device_count()
  for name, batch in (('train.batch_size', config.train.batch_size),
                      ('eval.batch_size', config.eval.batch_size)):
    _expect(batch >= 1 and batch % n == 0,
            f'{name}: global batch {batch} must be a positive multiple of the {n} devices '
            f'({jax.process_count()} process(es))')


def config_differences(saved: dict, current: dict, prefix: str = '') -> list:
  """Dotted names of the fields that differ between two nested config dicts."""
  diffs = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key), current.get(key)
    name = f'{prefix}{key}'
    if isinstance(a, dict) and isinstance(b, dict):
      diffs += config_differences(a, b, name + '.')
    elif (list(a) if isinstance(a, (list, tuple)) else a) != (
        list(b) if isinstance(b, (list, tuple)) else b):
      diffs.append(name)
  return diffs


def check_checkpoint_compatible(saved_config: Optional[dict], config, workdir: str) -> None:
  """A workdir's checkpoints were written for its config.json: refuse a different model."""
  if saved_config is None:
    return
  current = json.loads(config.to_json_best_effort())
  diffs = []
  for section in MODEL_SECTIONS:
    diffs += config_differences(saved_config.get(section, {}), current.get(section, {}), section + '.')
  diffs = [d for d in diffs if d.split('.')[-1] not in MODEL_FIELDS_THAT_MAY_CHANGE]
  _expect(not diffs, f'{workdir}: its checkpoints were trained with a different model config '
          f'(differing fields: {", ".join(diffs)}); use a new --workdir or the original config')
