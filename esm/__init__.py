"""ESM anomaly detection. `from esm import Detector` is the Python API (esm/detector.py); it is
imported on first use, so that `esm.export` loads without flax or the model code."""

__version__ = '0.15.0'
__all__ = ['Detector', '__version__']


def __getattr__(name):
  if name == 'Detector':
    from esm.detector import Detector  # pylint: disable=g-import-not-at-top
    return Detector
  raise AttributeError(f'module esm has no attribute {name!r}')
