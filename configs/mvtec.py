"""MVTec-AD: `--config=configs/mvtec.py:<category>`; no category (or 'all') runs every category.

T_D is the per-category partial-diffusion depth T_d of the paper's appendix table 6
(datasets/catalog.py).
"""

from configs.common import dataset_config
from datasets import catalog

T_D = catalog.PAPER_T_D['mvtec_ad']


def get_config(arg=None):
  return dataset_config('mvtec_ad', T_D, arg)
