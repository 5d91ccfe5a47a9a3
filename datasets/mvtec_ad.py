"""TFDS builder for MVTec-AD: one config per category; manual_dir holds the category folders.

Layout: <manual_dir>/<category>/{train/good, test/<type>, ground_truth/<type>/<stem>_mask.png},
as the official archive extracts. Prepared data are array_record (see datasets/builder.py).
"""

from datasets import builder
from datasets import catalog
from datasets import folder

CATEGORIES = catalog.categories('mvtec_ad')

class MvtecAd(builder.CategoryBuilder):
  """MVTec Anomaly Detection (Bergmann et al., CVPR 2019), 15 categories."""
  name = 'mvtec_ad'
  BUILDER_CONFIGS = [builder.CategoryConfig(name=c, description=f'MVTec-AD {c}')
                     for c in CATEGORIES]
  HOMEPAGE = 'https://www.mvtec.com/company/research/datasets/mvtec-ad'
  CITATION = ('Bergmann, Fauser, Sattlegger, Steger. MVTec AD - A Comprehensive Real-World '
              'Dataset for Unsupervised Anomaly Detection. CVPR 2019.')
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Download mvtec_anomaly_detection.tar.xz from the homepage, extract it, and pass the '
      'extracted folder (the one holding bottle/, cable/, ...) as manual_dir.')

  @classmethod
  def list_category(cls, root: str, category: str) -> folder.Listing:
    return folder.list_mvtec_layout(root, category, masks_required=True)

