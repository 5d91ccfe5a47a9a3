"""The datasets, their categories and the checks of config.data: the one list that the TFDS
builders, the configs and validation read. Each benchmark category carries the partial-diffusion
depth T_d that the paper set for it by hand (appendix tables 6-8); the dataset configs use it as
their default T_d. No heavy imports: configs and validation load this module.
"""

import dataclasses

from esm.errors import UserError

BENCHMARKS = ('mvtec_ad', 'visa', 'mpdd')  # datasets with a builder and a paper T_d table
DATASETS = BENCHMARKS + ('folder', 'synthetic')  # every value of config.data.dataset
SYNTHETIC_CATEGORIES = ('texture', 'object')  # the embedded synthetic data (datasets/synthetic.py)
MIN_IMAGE_SIZE = 8

PAPER_T_D = {
    'mvtec_ad': {  # table 6
        'bottle': 100,
        'cable': 200,
        'capsule': 48,
        'carpet': 250,
        'grid': 100,
        'hazelnut': 100,
        'leather': 49,
        'metal_nut': 100,
        'pill': 164,
        'screw': 45,
        'tile': 200,
        'toothbrush': 200,
        'transistor': 100,
        'wood': 20,
        'zipper': 280,
    },
    'visa': {  # table 7
        'candle': 3,
        'capsules': 50,
        'cashew': 50,
        'chewinggum': 10,
        'fryum': 50,
        'macaroni1': 50,
        'macaroni2': 50,
        'pcb1': 50,
        'pcb2': 50,
        'pcb3': 50,
        'pcb4': 50,
        'pipe_fryum': 50,
    },
    'mpdd': {  # table 8
        'bracket_black': 2,
        'bracket_brown': 3,
        'bracket_white': 2,
        'connector': 3,
        'metal_plate': 50,
        'tubes': 1,
    },
}


def categories(dataset: str) -> tuple:
  """The categories of a benchmark dataset, in the paper's order."""
  return tuple(PAPER_T_D[dataset])


def scaled_paper_t_d(dataset: str, category: str, num_steps: int):
  """The paper's T_d of a category (of T = 1000) scaled to num_steps, at least 1; None for a
  category outside tables 6-8."""
  t_d = PAPER_T_D.get(dataset, {}).get(category)
  return None if t_d is None else max(1, round(t_d * num_steps / 1000))


def known_categories(dataset: str) -> tuple:
  """Every category of a dataset with a fixed list; () for 'folder' (any sub-folder)."""
  if dataset in BENCHMARKS:
    return categories(dataset)
  return SYNTHETIC_CATEGORIES if dataset == 'synthetic' else ()


def check_dataset(dataset: str) -> None:
  if dataset not in DATASETS:
    raise UserError(f'data.dataset: expected one of {DATASETS}, got {dataset!r}')


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """config.data ('all' is a category: every one of the dataset in turn)."""
  dataset: str
  root: str
  category: str
  image_size: int
  train_crop: int
  tfds_dir: str
  val_fraction: float
  min_val_images: int
  hflip: bool
  vflip: bool
  num_workers: int
  cache_mb: int
  val_seed: int
  synthetic_size: int
  synthetic_num_train: int
  synthetic_num_test: int
  synthetic_seed: int

  def __post_init__(self):
    check_dataset(self.dataset)
    known = known_categories(self.dataset)
    if known and self.category not in known + ('all',):
      raise UserError(f'data.category: unknown {self.dataset} category {self.category!r}; '
                      f'expected one of: {", ".join(known)} or all')
    if self.image_size < MIN_IMAGE_SIZE:
      raise UserError(f'data.image_size: expected at least {MIN_IMAGE_SIZE}, got {self.image_size}')
    if self.train_crop and not MIN_IMAGE_SIZE <= self.train_crop <= self.image_size:
      raise UserError(f'data.train_crop: expected 0 (whole images) or a side in '
                      f'{MIN_IMAGE_SIZE}..data.image_size={self.image_size}, got {self.train_crop}')
    if not 0.0 <= self.val_fraction < 1.0:
      raise UserError(f'data.val_fraction: expected a fraction in [0, 1), got {self.val_fraction}')
    for name in ('num_workers', 'cache_mb', 'min_val_images'):
      if getattr(self, name) < 0:
        raise UserError(f'data.{name}: expected an integer >= 0, got {getattr(self, name)}')
    for name in ('synthetic_size', 'synthetic_num_train', 'synthetic_num_test'):
      if getattr(self, name) < 1:
        raise UserError(f'data.{name}: expected a positive integer, got {getattr(self, name)}')
