"""Config checks that run before any compute, each failing with a one-line UserError."""

from typing import Optional

import numpy as np

from esm.errors import UserError

MODES = ('train', 'eval', 'train_eval', 'predict')
DATASETS = ('mvtec_ad', 'visa', 'mpdd', 'folder', 'synthetic')
# Sections whose change makes a checkpoint unusable (parameter shapes or their meaning).
MODEL_SECTIONS = ('model', 'loss', 'sde')
MODEL_FIELDS_THAT_MAY_CHANGE = ('dropout', 'dtype')
# log σ² = log(1-ᾱ_i) + v with |v| < bound ('scaled'), and the loss uses exp(±log σ²). float32 and
# bfloat16 overflow past exp(88.7); 60 leaves 28 nats for log(1-ᾱ_i), which is >= -16.7 wherever
# 1-ᾱ_i is a positive float32.
MAX_LOG_VAR_BOUND = 60.0
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _expect(ok: bool, message: str) -> None:
  if not ok:
    raise UserError(message)


def validate_config(config, mode: str) -> None:
  """Everything that can be checked from the config alone."""
  # Imported here so that validating stays cheap for callers that never build a model.
  # pylint: disable=g-import-not-at-top
  from esm.detectors import DetectConfig
  from esm.models.unet import UNetConfig, check_image_size
  from esm.sampling import SamplingConfig
  # pylint: enable=g-import-not-at-top

  _expect(mode in MODES, f'--mode: expected one of {MODES}, got {mode!r}')
  d = config.data
  _expect(d.dataset in DATASETS, f'data.dataset: expected one of {DATASETS}, got {d.dataset!r}')
  known = sorted(dict(config.sampling.t_d_by_category))
  _expect(not known or d.category == 'all' or d.category in known,
          f'data.category: unknown {d.dataset} category {d.category!r}; expected one of: '
          f'{", ".join(known)} or all')
  _expect(d.image_size >= 8, f'data.image_size: expected at least 8, got {d.image_size}')
  _expect(0.0 <= d.val_fraction < 1.0, f'data.val_fraction: expected [0, 1), got {d.val_fraction}')
  check_image_size(UNetConfig.from_config(config.model), d.image_size)
  bound = config.model.log_var_bound
  _expect(0 < bound <= MAX_LOG_VAR_BOUND, f'model.log_var_bound: expected 0 < bound <= '
          f'{MAX_LOG_VAR_BOUND:g} (exp(±log σ²) must stay finite in float32/bfloat16), got {bound}')
  _expect(config.loss.kind in ('esm', 'dsm'), f"loss.kind: expected 'esm' or 'dsm', got {config.loss.kind!r}")

  s = config.sampling
  SamplingConfig.from_config(s)  # method, sigma_time, var_source, clamps, snapshot steps
  num_steps = config.sde.num_steps
  t_ds = [s.t_d] + list(dict(s.t_d_by_category).values())
  for t_d in t_ds:
    _expect(1 <= t_d <= num_steps, f'sampling.t_d: expected 1 <= T_d <= T={num_steps}, got {t_d}')
  _expect(0 < s.min_var <= s.max_var,
          f'sampling.min_var/max_var: expected 0 < min_var <= max_var, got {s.min_var}, {s.max_var}')
  _expect(not (s.method != 'sgm' and config.loss.kind == 'dsm') or mode == 'train',
          f"sampling.method={s.method!r} needs a dual-stream model (loss.kind='esm'); a DSM model "
          "only supports sampling.method='sgm'")

  DetectConfig.from_config(config.detect)  # weights (u, v, w, r), blur, N_a, re_kind, floor

  t = config.train
  _expect(0 < t.lr < FLOAT32_MAX, f'train.lr: expected a positive float32 value, got {t.lr}')
  for name in ('num_steps', 'batch_size', 'log_every', 'ckpt_every', 'keep', 'max_bad_steps',
               'inject_nonfinite_count'):
    _expect(t[name] >= 1, f'train.{name}: expected a positive integer, got {t[name]}')


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
  import json  # pylint: disable=g-import-not-at-top
  current = json.loads(config.to_json_best_effort())
  diffs = []
  for section in MODEL_SECTIONS:
    diffs += config_differences(saved_config.get(section, {}), current.get(section, {}), section + '.')
  diffs = [d for d in diffs if d.split('.')[-1] not in MODEL_FIELDS_THAT_MAY_CHANGE]
  _expect(not diffs, f'{workdir}: its checkpoints were trained with a different model config '
          f'(differing fields: {", ".join(diffs)}); use a new --workdir or the original config')
