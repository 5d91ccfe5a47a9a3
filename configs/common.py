"""Helpers shared by the configs: category selection, and the model presets (micro, tiny, cpu)
that tests, the demo, the CPU-scale study and the benchmarks use."""

import copy
from typing import Any, Mapping

from configs.default import get_default_config


def dataset_config(dataset: str, t_d_table: dict, arg=None):
  """The default config for one category of a benchmark (arg = category name, or 'all'/None)."""
  category = (arg or 'all').strip()
  c = get_default_config()  # an unknown category is reported by esm.validate, in one line
  c.data.dataset = dataset
  c.data.category = category
  c.sampling.t_d = t_d_table.get(category, 100)
  c.sampling.t_d_by_category = dict(t_d_table)  # used when category is 'all'
  c.train.num_epochs = 1000  # paper section 4.1: 1000 epochs
  return c


def override(config, changes: Mapping[str, Any]):
  """A copy of config with dotted fields set, e.g. {'train.lr': 1e-3}. An unknown field is a
  KeyError (ConfigDict.update_from_flattened_dict would skip it silently)."""
  c = copy.deepcopy(config)
  for dotted, value in changes.items():
    *path, leaf = dotted.split('.')
    node = c
    for part in path:
      node = node[part]
    if leaf not in node:
      raise KeyError(f'{dotted}: no such config field')
    node[leaf] = value
  return c


def set_tiny_model(c):
  """A U-Net small enough to compile in seconds on CPU: for tests and the demo."""
  m = c.model
  m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 16, (1, 2), 1, (8,)
  m.num_groups, m.dropout = 8, 0.0
  return c


def set_micro_model(c):
  """One level, 8 channels, no attention: for tests of mechanisms that do not depend on the
  model's size (checkpointing, parallelism, precision), where compilation is most of the time."""
  m = set_tiny_model(c).model
  m.ch, m.ch_mult, m.attn_resolutions, m.num_groups = 8, (1,), (), 4
  return c


def set_cpu_model(c, image_size: int):
  """The CPU-scale U-Net of configs/cpu/ at image_size² inputs: ch 16, levels (1, 2, 2), one block
  per level, attention at the last level (image_size / 4)."""
  c.data.image_size = image_size
  m = c.model
  m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 16, (1, 2, 2), 1, (image_size // 4,)
  m.num_groups, m.dropout = 8, 0.0
  return c
