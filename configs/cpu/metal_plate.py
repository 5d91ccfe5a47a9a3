"""MPDD metal_plate at CPU scale: only reported, never tuned on (configs/cpu/common.py).

  python main.py --config=configs/cpu/metal_plate.py --config.data.root=../shared/data/mpdd --workdir=DIR
"""

from configs.cpu.common import cpu_config


def get_config(arg=None):
  del arg
  return cpu_config('mpdd', 'metal_plate')
