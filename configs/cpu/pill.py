"""MVTec-AD pill at CPU scale, a development category with small defects (configs/cpu/common.py).

  python main.py --config=configs/cpu/pill.py --config.data.root=../shared/data/mvtec_ad --workdir=DIR
"""

from configs.cpu.common import cpu_config


def get_config(arg=None):
  del arg
  return cpu_config('mvtec_ad', 'pill')
