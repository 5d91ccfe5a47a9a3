"""MVTec-AD bottle at CPU scale, the development category of the study (configs/cpu/common.py).

  python main.py --config=configs/cpu/bottle.py --config.data.root=../shared/data/mvtec_ad --workdir=DIR
"""

from configs.cpu.common import cpu_config


def get_config(arg=None):
  del arg
  return cpu_config('mvtec_ad', 'bottle')
