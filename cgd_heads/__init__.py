"""cgd_heads: Combination of multiple Global Descriptors (Jun et al. 2019, arXiv 1903.10663) for timm backbones.

Example:
    >>> import cgd_heads
    >>> model = cgd_heads.create_model('resnet50', descriptors='SG', embed_dim=1536, num_classes=98)
"""
from .checkpoint import load_pretrained, save_pretrained
from .export import export_onnx
from .extract import extract_embeddings
from .heads import AuxSoftmaxHead, CGDHead
from .index import RetrievalIndex
from .loss import CGDLoss
from .metrics import evaluate_retrieval
from .model import CGDModel, create_model
from .pooling import GeneralizedPooling, generalized_mean
from .shards import ShardedIndex
from .stride import feature_map_size, strip_last_stride
from .training import TrainConfig, train
from .variants import ConcatFCHead

__version__ = '0.1.0'

__all__ = [
    'AuxSoftmaxHead',
    'CGDHead',
    'CGDLoss',
    'CGDModel',
    'ConcatFCHead',
    'GeneralizedPooling',
    'RetrievalIndex',
    'ShardedIndex',
    'TrainConfig',
    'create_model',
    'evaluate_retrieval',
    'export_onnx',
    'extract_embeddings',
    'feature_map_size',
    'generalized_mean',
    'load_pretrained',
    'save_pretrained',
    'strip_last_stride',
    'train',
]
