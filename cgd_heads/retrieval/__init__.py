"""Retrieval on embeddings: extraction (with flip / multi-scale views), Recall@K, MAP@R and NMI, a persistent faiss
index, sharded search, the retrieval grid, and post-processing (PCA / learned whitening, alpha-QE and DBA,
k-reciprocal re-ranking). Loads faiss; nothing here trains."""
from .arrays import UNIT_NORM_TOLERANCE, to_embedding_array
from .clustering import nmi_from_clusters, normalized_mutual_info
from .extract import extract_embeddings, load_embeddings, save_embeddings
from .index import RetrievalIndex, SearchHit
from .index_types import INDEX_TYPES
from .metrics import evaluate_retrieval
from .postprocess import PostProcess, evaluate_postprocessed
from .query_expansion import database_augmentation, query_expansion
from .rerank import k_reciprocal_rerank_dense, k_reciprocal_rerank_sparse
from .shards import ShardedIndex, ShardHit, index_to_gpu
from .visualize import save_retrieval_grid
from .whitening import Whitening, model_fingerprint

__all__ = ['INDEX_TYPES', 'PostProcess', 'RetrievalIndex', 'SearchHit', 'ShardHit', 'ShardedIndex',
           'UNIT_NORM_TOLERANCE', 'Whitening', 'database_augmentation', 'evaluate_postprocessed', 'evaluate_retrieval',
           'extract_embeddings', 'index_to_gpu', 'k_reciprocal_rerank_dense', 'k_reciprocal_rerank_sparse',
           'load_embeddings', 'model_fingerprint', 'nmi_from_clusters', 'normalized_mutual_info', 'query_expansion',
           'save_embeddings', 'save_retrieval_grid', 'to_embedding_array']
