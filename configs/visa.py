"""VisA: `--config=configs/visa.py:<category>`; no category (or 'all') runs every category.

T_D holds the per-category partial-diffusion depth T_d of the paper's appendix table 7.
"""

from configs.common import dataset_config

T_D = {
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
}


def get_config(arg=None):
  return dataset_config('visa', T_D, arg)
