"""Config checks that span sections, run before any compute, each failing with a one-line UserError.

Each section checks its own fields once, in its dataclass (esm/config.py); this module keeps the
checks that need two of them: T_d against the schedule, the sampler against the model, the image
size against the U-Net, the batches against the devices, and a workdir's checkpoint against the
config. It imports no dataset, checkpoint or model-building code.
"""

from typing import Optional

import jax

from esm.config import Config, field_differences, to_dict
from esm.errors import UserError
from esm.models.unet import check_image_size
from esm.modes import MODE_NAMES
from esm.sampling import check_t_d

# Sections whose change makes a checkpoint unusable (parameter shapes or their meaning).
MODEL_SECTIONS = ('model', 'loss', 'sde')
MODEL_FIELDS_THAT_MAY_CHANGE = ('dropout', 'dtype')


def _expect(ok: bool, message: str) -> None:
  if not ok:
    raise UserError(message)


def validate_config(config: Config, mode: str) -> None:
  """The checks across sections that the config alone allows, before `mode` runs."""
  _expect(mode in MODE_NAMES, f'--mode: expected one of {MODE_NAMES}, got {mode!r}')
  check_image_size(config.model.unet, config.data.image_size)
  if config.data.train_crop:
    check_image_size(config.model.unet, config.data.train_crop)
  sampling = config.sampling
  for t_d in [sampling.t_d] + list(sampling.t_d_by_category.values()):
    check_t_d(t_d, config.sde.num_steps)
  _expect(not sampling.sampler.needs_variance or config.loss.dual_stream or mode == 'train',
          f"sampling.method={sampling.method!r} needs a dual-stream model (loss.kind='esm'); a DSM "
          "model supports only the samplers that do not read σ²_θ (sampling.method='sgm')")


def check_batches_split_over_devices(config: Config) -> None:
  """The global train and eval batches must split evenly over every device of every process."""
  n = jax.device_count()
  for name, batch in (('train.batch_size', config.train.batch_size),
                      ('eval.batch_size', config.eval.batch_size)):
    _expect(batch >= 1 and batch % n == 0,
            f'{name}: global batch {batch} must be a positive multiple of the {n} devices '
            f'({jax.process_count()} process(es))')


def check_checkpoint_compatible(saved_config: Optional[dict], config: Config, workdir: str) -> None:
  """A workdir's checkpoints were written for its config.json: refuse a different model."""
  if saved_config is None:
    return
  current = to_dict(config)
  diffs = []
  for section in MODEL_SECTIONS:
    diffs += field_differences(saved_config.get(section, {}), current.get(section, {}), section + '.')
  diffs = [d for d in diffs if d.split('.')[-1] not in MODEL_FIELDS_THAT_MAY_CHANGE]
  _expect(not diffs, f'{workdir}: its checkpoints were trained with a different model config '
          f'(differing fields: {", ".join(diffs)}); use a new --workdir or the original config')
