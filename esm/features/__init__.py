"""Pretrained DINO/DINOv2 ViT features for the S_Cos detector (see extractor.get_feature_fn)."""

from esm.features.extractor import FeatureFn
from esm.features.extractor import get_feature_fn
from esm.features.extractor import load_params
from esm.features.vit import LAYOUTS
from esm.features.vit import ViT
from esm.features.vit import ViTConfig
