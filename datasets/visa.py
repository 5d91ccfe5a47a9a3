"""TFDS builder for VisA: one config per category; manual_dir holds the categories and split_csv.

Layout: <manual_dir>/<category>/Data/Images/{Normal,Anomaly}, <category>/Data/Masks/Anomaly, and
the official one-class split <manual_dir>/split_csv/1cls.csv (columns object, split, label, image,
mask). Defect images have defect_type 'anomaly' (the split file carries no finer type).
"""

from datasets import builder
from datasets import catalog
from datasets import folder

CATEGORIES = catalog.categories('visa')


class Visa(builder.CategoryBuilder):
  """Visual Anomaly dataset (Zou et al., ECCV 2022), 12 categories."""
  name = 'visa'
  BUILDER_CONFIGS = [builder.CategoryConfig(name=c, description=f'VisA {c}') for c in CATEGORIES]
  HOMEPAGE = 'https://github.com/amazon-science/spot-diff'
  CITATION = ('Zou, Jeong, Pemula, Zhang, Dabeer. SPot-the-Difference Self-supervised '
              'Pre-training for Anomaly Detection and Segmentation. ECCV 2022.')
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Download VisA_20220922.tar and split_csv/1cls.csv from the homepage; extract so that '
      'manual_dir holds candle/, ..., pipe_fryum/ and split_csv/1cls.csv.')

  @classmethod
  def list_category(cls, root: str, category: str) -> folder.Listing:
    return folder.list_visa_layout(root, category)
