"""Retrieval on embeddings: extraction (with flip / multi-scale views, also into work units under torchrun),
Recall@K, MAP@R and NMI, a persistent faiss index (also built from units, with on-disk IVF lists), sharded search,
the retrieval grid, and post-processing (PCA / learned whitening, alpha-QE and DBA, k-reciprocal re-ranking). Loads
faiss; nothing here trains."""
from .arrays import UNIT_NORM_TOLERANCE, to_embedding_array
from .clustering import nmi_from_clusters, normalized_mutual_info
from .distributed_extract import extract_units
from .extract import extract_embeddings, load_embeddings, save_embeddings
from .index import RetrievalIndex, SearchHit
from .index_types import INDEX_TYPES
from .metrics import evaluate_retrieval
from .postprocess import PostProcess, evaluate_postprocessed
from .query_expansion import database_augmentation, query_expansion
from .rerank import k_reciprocal_rerank_dense, k_reciprocal_rerank_sparse
from .shards import ShardedIndex, ShardHit, index_to_gpu
from .unit_index import build_index_from_units, load_index
from .units import (NO_LABEL, EmbeddingUnit, EmbeddingUnits, checkpoint_fingerprint, list_fingerprint, load_units,
                    weights_fingerprint)
from .visualize import save_retrieval_grid
from .whitening import Whitening, model_fingerprint

__all__ = ['EmbeddingUnit', 'EmbeddingUnits', 'INDEX_TYPES', 'NO_LABEL', 'PostProcess', 'RetrievalIndex', 'SearchHit',
           'ShardHit', 'ShardedIndex', 'UNIT_NORM_TOLERANCE', 'Whitening', 'build_index_from_units',
           'checkpoint_fingerprint', 'database_augmentation', 'evaluate_postprocessed', 'evaluate_retrieval',
           'extract_embeddings', 'extract_units', 'index_to_gpu', 'k_reciprocal_rerank_dense',
           'k_reciprocal_rerank_sparse', 'list_fingerprint', 'load_embeddings', 'load_index', 'load_units',
           'model_fingerprint', 'nmi_from_clusters', 'normalized_mutual_info', 'query_expansion', 'save_embeddings',
           'save_retrieval_grid', 'to_embedding_array', 'weights_fingerprint']
