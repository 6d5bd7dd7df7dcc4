"""cgd_heads: Combination of multiple Global Descriptors (Jun et al. 2019, arXiv 1903.10663) for timm backbones.

Example:
    >>> import cgd_heads
    >>> model = cgd_heads.create_model('resnet50', descriptors='SG', embed_dim=1536, num_classes=98)
"""
from .heads import AuxSoftmaxHead, CGDHead
from .loss import CGDLoss
from .model import CGDModel, create_model
from .pooling import GeneralizedPooling, generalized_mean
from .stride import feature_map_size, strip_last_stride

__version__ = '0.1.0'

__all__ = [
    'AuxSoftmaxHead',
    'CGDHead',
    'CGDLoss',
    'CGDModel',
    'GeneralizedPooling',
    'create_model',
    'feature_map_size',
    'generalized_mean',
    'strip_last_stride',
]
