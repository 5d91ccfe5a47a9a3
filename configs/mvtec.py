"""MVTec-AD: `--config=configs/mvtec.py:<category>`; no category (or 'all') runs every category.

T_D holds the per-category partial-diffusion depth T_d of the paper's appendix table 6.
"""

from configs.common import dataset_config

T_D = {
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
}


def get_config(arg=None):
  return dataset_config('mvtec_ad', T_D, arg)
