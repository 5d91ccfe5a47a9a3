"""MPDD: `--config=configs/mpdd.py:<category>`; no category (or 'all') runs every category.

T_D holds the per-category partial-diffusion depth T_d of the paper's appendix table 8.
"""

from configs.common import dataset_config

T_D = {
    'bracket_black': 2,
    'bracket_brown': 3,
    'bracket_white': 2,
    'connector': 3,
    'metal_plate': 50,
    'tubes': 1,
}


def get_config(arg=None):
  return dataset_config('mpdd', T_D, arg)
