"""Search several saved indexes as one gallery, and move an index to the GPU when faiss has GPU support.

A gallery that outgrows one machine's memory (or one file) is split into shards, each an ordinary
:class:`~cgd_heads.retrieval.index.RetrievalIndex` built and saved on its own (e.g. one per data folder or per day).
A query searches every shard for its top k and the per-shard lists are merged by score: the exact top k of the union for
flat shards (the approximate shards' own recall otherwise). This is what ``faiss.IndexShards`` does inside one
process, kept at the level of our indexes so each shard keeps its labels, paths and metadata.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

from ..utils.checks import PathLike
from .arrays import ArrayLike
from .faiss_import import faiss
from .index import RetrievalIndex, SearchHit

__all__ = ['ShardedIndex', 'ShardHit', 'index_to_gpu']


@dataclass(frozen=True)
class ShardHit(SearchHit):
    """A :class:`~cgd_heads.retrieval.index.SearchHit` plus the shard it came from (``id``: the id in that shard)."""
    shard: int = 0


class ShardedIndex:
    """Several :class:`RetrievalIndex` shards of the same embedding space, searched as one.

    Args:
        shards: The indexes; same dimension, the same whitening (or none), and (when they record one) the same
            model metadata.
    """

    def __init__(self, shards: Sequence[RetrievalIndex]):
        if not shards:
            raise ValueError('shards must hold at least one RetrievalIndex')
        dims = {s.dim for s in shards}
        if len(dims) != 1:
            raise ValueError(f'all shards must have the same dim, got {sorted(dims)}')
        models = {repr(s.metadata.get('model')) for s in shards if 'model' in s.metadata}
        if len(models) > 1:
            raise ValueError('the shards were built with different models (metadata["model"] differs): their '
                             'scores are not comparable')
        first = shards[0].whitening
        for shard in shards[1:]:
            other = shard.whitening
            if (first is None) != (other is None) or (first is not None and not (
                    np.array_equal(first.mean, other.mean) and np.array_equal(first.projection, other.projection))):
                raise ValueError('the shards store vectors through different whitenings (or some through none): '
                                 'their scores are not comparable')
        self.shards = list(shards)

    @classmethod
    def load(cls, directories: Sequence[PathLike]) -> 'ShardedIndex':
        """Load each saved :class:`RetrievalIndex` folder (see :meth:`RetrievalIndex.load`) as one shard, in order."""
        return cls([RetrievalIndex.load(d) for d in directories])

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def search(self, queries: ArrayLike, k: int = 10) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-``k`` over all shards: ``(scores, shard_ids, ids)``, each ``(Q, min(k, len(self)))``, best first."""
        per_shard = [s.search(queries, k) for s in self.shards]
        scores = np.concatenate([sc for sc, _ in per_shard], axis=1)
        ids = np.concatenate([i for _, i in per_shard], axis=1)
        shard_ids = np.concatenate([np.full_like(i, n) for n, (_, i) in enumerate(per_shard)], axis=1)
        k = min(k, len(self))
        # stable sort: equal scores keep shard order, so results do not depend on the sort implementation
        order = np.argsort(-scores, axis=1, kind='stable')[:, :k]
        take = np.take_along_axis
        return take(scores, order, 1), take(shard_ids, order, 1), take(ids, order, 1)

    def search_hits(self, queries: ArrayLike, k: int = 10) -> List[List[ShardHit]]:
        """:meth:`search` as one list of :class:`ShardHit` per query (shard, id within it, score, label, path),
        best first; empty slots (fewer than ``k`` vectors in all the shards) are left out."""
        scores, shard_ids, ids = self.search(queries, k)
        hits = []
        for row_scores, row_shards, row_ids in zip(scores, shard_ids, ids):
            row = []
            for score, shard, i in zip(row_scores, row_shards, row_ids):
                if i >= 0:
                    index = self.shards[shard]  # the lists themselves: .labels/.paths copy a whole shard per call
                    row.append(ShardHit(int(i), float(score), index._labels[i], index._paths[i], int(shard)))
            hits.append(row)
        return hits


def index_to_gpu(index: RetrievalIndex, device: int = 0) -> RetrievalIndex:
    """A search-only copy of ``index`` whose faiss index lives on GPU ``device`` (needs faiss with GPU support).

    Keep (and save) the CPU index; the copy is for fast queries.

    Raises:
        RuntimeError: this faiss has no GPU support (``faiss-cpu``): install ``faiss-gpu`` (or conda's faiss-gpu)
            on a machine with CUDA.
    """
    if not hasattr(faiss, 'StandardGpuResources') or faiss.get_num_gpus() == 0:
        raise RuntimeError('this faiss has no GPU support or sees no GPU (faiss-cpu is installed); install faiss-gpu '
                           'on a CUDA machine to search on the GPU, or keep the CPU index')
    resources = faiss.StandardGpuResources()
    gpu = faiss.index_cpu_to_gpu(resources, device, index.faiss_index)
    gpu.referenced_resources = resources  # keep the resources alive as long as the index
    copy = RetrievalIndex.__new__(RetrievalIndex)
    copy.__dict__.update(index.__dict__)
    # own lists: an add() on the copy must not grow the CPU index's labels without its vectors
    copy._labels, copy._paths, copy._index = list(index._labels), list(index._paths), gpu
    return copy
