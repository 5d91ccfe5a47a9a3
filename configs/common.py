"""Helpers shared by the dataset configs: category selection and the model sizes."""

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


def set_cpu_model(c):
  """The CPU-scale model: 64² images on a 2-core machine."""
  m = c.model
  m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 32, (1, 2, 2, 2), 1, (8,)
  m.num_groups, m.dropout = 8, 0.0
  return c
