"""Sharded search equals one exact index over the union; GPU faiss absence is a clear error."""
import numpy as np
import pytest
import torch

from cgd_heads.retrieval.index import RetrievalIndex
from cgd_heads.retrieval.shards import ShardedIndex, index_to_gpu


def unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_sharded_search_equals_a_single_exact_index(tmp_path):
    x, q = unit(300, 16, 0), unit(20, 16, 1)
    bounds = [0, 70, 190, 300]
    for s in range(3):
        RetrievalIndex.build(x[bounds[s]:bounds[s + 1]], labels=list(range(bounds[s], bounds[s + 1])),
                             metadata={'model': {'name': 'm'}}).save(tmp_path / f'shard{s}')
    sharded = ShardedIndex.load([tmp_path / f'shard{s}' for s in range(3)])
    assert len(sharded) == 300
    scores, shard_ids, ids = sharded.search(q, k=10)
    reference = torch.from_numpy(q @ x.T).topk(10, dim=1)
    np.testing.assert_allclose(scores, reference.values.numpy(), rtol=1e-5, atol=1e-6)
    global_ids = np.array(bounds)[shard_ids] + ids
    np.testing.assert_array_equal(global_ids, reference.indices.numpy())
    hits = sharded.search_hits(q, k=3)
    assert [h.label for h in hits[0]] == reference.indices[0, :3].tolist()  # labels were the global ids


def test_shards_of_different_models_or_dims_are_refused():
    a = RetrievalIndex.build(unit(5, 8, 0), metadata={'model': {'name': 'a'}})
    b = RetrievalIndex.build(unit(5, 8, 1), metadata={'model': {'name': 'b'}})
    with pytest.raises(ValueError, match='different models'):
        ShardedIndex([a, b])
    with pytest.raises(ValueError, match='same dim'):
        ShardedIndex([a, RetrievalIndex.build(unit(5, 4, 2))])


def test_gpu_without_gpu_faiss_is_a_clear_error():
    import faiss
    if hasattr(faiss, 'StandardGpuResources') and faiss.get_num_gpus() > 0:
        pytest.skip('GPU faiss is available here')
    with pytest.raises(RuntimeError, match='install faiss-gpu'):
        index_to_gpu(RetrievalIndex.build(unit(5, 8, 0)))
