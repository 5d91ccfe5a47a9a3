"""TFDS builder for MPDD (metal parts): one config per category; manual_dir holds the categories.

MPDD uses the MVTec layout: <manual_dir>/<category>/{train/good, test/<type>,
ground_truth/<type>/<stem>_mask.png}. Prepared data are array_record (see datasets/builder.py).
"""

from datasets import builder
from datasets import catalog
from datasets import folder

CATEGORIES = catalog.categories('mpdd')


class Mpdd(builder.CategoryBuilder):
  """Metal Parts Defect Detection (Jezek et al., ICUMT 2021), 6 categories."""
  name = 'mpdd'
  BUILDER_CONFIGS = [builder.CategoryConfig(name=c, description=f'MPDD {c}') for c in CATEGORIES]
  HOMEPAGE = 'https://github.com/stepanje/MPDD'
  CITATION = ('Jezek, Jonak, Burget, Dvorak, Skotak. Deep learning-based defect detection of '
              'metal parts: evaluating current methods in complex conditions. ICUMT 2021.')
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Download MPDD from the homepage, extract it, and pass the folder holding '
      'bracket_black/, ..., tubes/ as manual_dir.')

  @classmethod
  def list_category(cls, root: str, category: str) -> folder.Listing:
    return folder.list_mvtec_layout(root, category, masks_required=True)
