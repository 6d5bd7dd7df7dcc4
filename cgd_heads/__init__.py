"""cgd_heads: Combination of multiple Global Descriptors (Jun et al. 2019, arXiv 1903.10663) for timm backbones.

The public names below load on first use (PEP 562), so ``from cgd_heads import CGDHead`` loads the layers and
torch, not faiss, the trainer or ``torch.distributed``.

Example:
    >>> import cgd_heads
    >>> model = cgd_heads.create_model('resnet50', descriptors='SG', embed_dim=1536, num_classes=98)
"""
import importlib
from typing import TYPE_CHECKING, Any, List

from .version import __version__

#: Public name -> the module that defines it.
_EXPORTS = {
    'AuxSoftmaxHead': 'cgd_heads.layers.heads',
    'CGDHead': 'cgd_heads.layers.heads',
    'ConcatFCHead': 'cgd_heads.layers.variants',
    'GeneralizedPooling': 'cgd_heads.layers.pooling',
    'generalized_mean': 'cgd_heads.layers.pooling',
    'CGDModel': 'cgd_heads.models.cgd_model',
    'create_model': 'cgd_heads.models.cgd_model',
    'load_pretrained': 'cgd_heads.models.cgd_model',
    'save_pretrained': 'cgd_heads.models.checkpoint',
    'export_onnx': 'cgd_heads.models.export',
    'OffTheShelfModel': 'cgd_heads.models.off_the_shelf',
    'create_off_the_shelf': 'cgd_heads.models.off_the_shelf',
    'feature_map_size': 'cgd_heads.models.stride',
    'strip_last_stride': 'cgd_heads.models.stride',
    'CGDLoss': 'cgd_heads.losses.cgd_loss',
    'RetrievalIndex': 'cgd_heads.retrieval.index',
    'ShardedIndex': 'cgd_heads.retrieval.shards',
    'EmbeddingUnits': 'cgd_heads.retrieval.units',
    'load_units': 'cgd_heads.retrieval.units',
    'extract_units': 'cgd_heads.retrieval.distributed_extract',
    'build_index_from_units': 'cgd_heads.retrieval.unit_index',
    'load_index': 'cgd_heads.retrieval.unit_index',
    'evaluate_retrieval': 'cgd_heads.retrieval.metrics',
    'PostProcess': 'cgd_heads.retrieval.postprocess',
    'evaluate_postprocessed': 'cgd_heads.retrieval.postprocess',
    'extract_embeddings': 'cgd_heads.retrieval.extract',
    'Whitening': 'cgd_heads.retrieval.whitening',
    'model_fingerprint': 'cgd_heads.retrieval.whitening',
    'database_augmentation': 'cgd_heads.retrieval.query_expansion',
    'query_expansion': 'cgd_heads.retrieval.query_expansion',
    'k_reciprocal_rerank_dense': 'cgd_heads.retrieval.rerank',
    'k_reciprocal_rerank_sparse': 'cgd_heads.retrieval.rerank',
    'nmi_from_clusters': 'cgd_heads.retrieval.clustering',
    'normalized_mutual_info': 'cgd_heads.retrieval.clustering',
    'TrainConfig': 'cgd_heads.training.config',
    'recipe_config': 'cgd_heads.training.recipes',
    'train': 'cgd_heads.training.trainer',
}

__all__ = [
    'AuxSoftmaxHead', 'CGDHead', 'CGDLoss', 'CGDModel', 'ConcatFCHead', 'EmbeddingUnits', 'GeneralizedPooling',
    'OffTheShelfModel', 'PostProcess', 'RetrievalIndex', 'ShardedIndex', 'TrainConfig', 'Whitening', '__version__',
    'build_index_from_units', 'create_model', 'create_off_the_shelf', 'database_augmentation',
    'evaluate_postprocessed', 'evaluate_retrieval', 'export_onnx', 'extract_embeddings', 'extract_units',
    'feature_map_size',
    'generalized_mean', 'k_reciprocal_rerank_dense', 'k_reciprocal_rerank_sparse', 'load_index', 'load_pretrained',
    'load_units', 'model_fingerprint', 'nmi_from_clusters', 'normalized_mutual_info', 'query_expansion',
    'recipe_config', 'save_pretrained', 'strip_last_stride', 'train',
]

if TYPE_CHECKING:  # what IDEs, type checkers and documentation tools read
    from .layers.heads import AuxSoftmaxHead, CGDHead
    from .layers.pooling import GeneralizedPooling, generalized_mean
    from .layers.variants import ConcatFCHead
    from .losses.cgd_loss import CGDLoss
    from .models.cgd_model import CGDModel, create_model, load_pretrained
    from .models.checkpoint import save_pretrained
    from .models.export import export_onnx
    from .models.off_the_shelf import OffTheShelfModel, create_off_the_shelf
    from .models.stride import feature_map_size, strip_last_stride
    from .retrieval.clustering import nmi_from_clusters, normalized_mutual_info
    from .retrieval.distributed_extract import extract_units
    from .retrieval.extract import extract_embeddings
    from .retrieval.index import RetrievalIndex
    from .retrieval.metrics import evaluate_retrieval
    from .retrieval.postprocess import PostProcess, evaluate_postprocessed
    from .retrieval.query_expansion import database_augmentation, query_expansion
    from .retrieval.rerank import k_reciprocal_rerank_dense, k_reciprocal_rerank_sparse
    from .retrieval.shards import ShardedIndex
    from .retrieval.unit_index import build_index_from_units, load_index
    from .retrieval.units import EmbeddingUnits, load_units
    from .retrieval.whitening import Whitening, model_fingerprint
    from .training.config import TrainConfig
    from .training.recipes import recipe_config
    from .training.trainer import train


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
