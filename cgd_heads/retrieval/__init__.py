"""Retrieval on embeddings: extraction (with flip / multi-scale views), Recall@K and MAP@R, a persistent faiss
index, sharded search, and the retrieval grid. Loads faiss; nothing here trains."""
from .arrays import UNIT_NORM_TOLERANCE, to_embedding_array
from .extract import extract_embeddings, load_embeddings, save_embeddings
from .index import RetrievalIndex, SearchHit
from .index_types import INDEX_TYPES
from .metrics import evaluate_retrieval
from .shards import ShardedIndex, ShardHit, index_to_gpu
from .visualize import save_retrieval_grid

__all__ = ['INDEX_TYPES', 'RetrievalIndex', 'SearchHit', 'ShardHit', 'ShardedIndex', 'UNIT_NORM_TOLERANCE',
           'evaluate_retrieval', 'extract_embeddings', 'index_to_gpu', 'load_embeddings', 'save_embeddings',
           'save_retrieval_grid', 'to_embedding_array']
