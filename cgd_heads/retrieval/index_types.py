"""The faiss index types a :class:`~cgd_heads.retrieval.index.RetrievalIndex` can hold: how each is created, its
options with their defaults, and the search-time knobs set on every build and load."""
from __future__ import annotations

import math
from typing import Any, Dict, Tuple

from ..utils.checks import check_int
from .faiss_import import faiss

__all__ = ['INDEX_TYPES', 'HNSW_DEFAULTS', 'IVF_KEYS', 'FAISS_CLASSES', 'make_index', 'apply_search_params',
           'check_params']

#: Index types :meth:`RetrievalIndex.build` accepts.
INDEX_TYPES = ('flat', 'hnsw', 'ivf')
HNSW_DEFAULTS = {'M': 32, 'ef_construction': 40, 'ef_search': 64}
IVF_KEYS = ('nlist', 'nprobe', 'pq_m', 'pq_nbits')


def make_index(index_type: str, dim: int, n_train: int, kwargs: Dict[str, Any]) -> Tuple[Any, Dict[str, Any]]:
    """Create an empty faiss inner-product index and return it with its full, defaults-filled parameters."""
    if index_type == 'flat':
        if kwargs:
            raise TypeError(f"index_type='flat' takes no index options, got {sorted(kwargs)}")
        return faiss.IndexFlatIP(dim), {}
    if index_type == 'hnsw':
        unknown = set(kwargs) - set(HNSW_DEFAULTS)
        if unknown:
            raise TypeError(f"index_type='hnsw' options are {sorted(HNSW_DEFAULTS)}, got unknown {sorted(unknown)}")
        params = {key: check_int(kwargs.get(key, default), key) for key, default in HNSW_DEFAULTS.items()}
        index = faiss.IndexHNSWFlat(dim, params['M'], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params['ef_construction']
        return index, params
    if index_type == 'ivf':
        unknown = set(kwargs) - set(IVF_KEYS)
        if unknown:
            raise TypeError(f"index_type='ivf' options are {list(IVF_KEYS)}, got unknown {sorted(unknown)}")
        # faiss recommends >= 39 training vectors per centroid and ~4 * sqrt(N) lists; take the smaller
        default_nlist = max(1, min(int(4 * math.sqrt(n_train)), n_train // 39))
        nlist = check_int(kwargs.get('nlist', default_nlist), 'nlist')
        # faiss's default nprobe = 1 scans one list of nlist and loses much recall; 16 is a common compromise
        nprobe = check_int(kwargs.get('nprobe', min(nlist, 16)), 'nprobe')
        if nprobe > nlist:
            raise ValueError(f'nprobe must be <= nlist ({nlist}), got {nprobe}')
        pq_m = kwargs.get('pq_m')
        # an IVF-Flat index records the default pq_nbits=8 in its params, so rebuilding from them must pass
        if pq_m is None and kwargs.get('pq_nbits', 8) != 8:
            raise ValueError(f"pq_nbits={kwargs['pq_nbits']!r} needs pq_m (IVF-PQ); without pq_m the index is "
                             f"IVF-Flat, which stores whole vectors")
        pq_nbits = check_int(kwargs.get('pq_nbits', 8), 'pq_nbits')
        min_train = nlist
        if pq_m is None:
            spec = f'IVF{nlist},Flat'
        else:
            pq_m = check_int(pq_m, 'pq_m')
            if dim % pq_m:
                raise ValueError(f'pq_m must divide the embedding dim {dim}, got {pq_m}')
            # each of the pq_m sub-quantisers is a k-means with 2^pq_nbits centroids
            min_train = max(nlist, 2 ** pq_nbits)
            spec = f'IVF{nlist},PQ{pq_m}x{pq_nbits}'
        if n_train < min_train:
            raise ValueError(
                f'too few embeddings to train an IVF index: got {n_train}, need at least {min_train} '
                f'(nlist={nlist}' + (f', 2^pq_nbits={2 ** pq_nbits})' if pq_m is not None else ')')
                + '; pass a smaller nlist or use index_type="flat"'
            )
        index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
        if pq_m is not None:
            # the factory turns on polysemous training, which only serves Hamming-filtered search
            # (polysemous_ht > 0, never used here) and takes ~25x longer than the k-means itself
            faiss.downcast_index(index).do_polysemous_training = False
        return index, {'nlist': nlist, 'nprobe': nprobe, 'pq_m': pq_m, 'pq_nbits': pq_nbits}
    raise ValueError(f'index_type must be one of {INDEX_TYPES}, got {index_type!r}')


def apply_search_params(index: Any, index_type: str, params: Dict[str, Any]) -> None:
    # search-time knobs: set on every build/load so a saved value is never silently replaced by faiss's default
    if index_type == 'hnsw':
        faiss.downcast_index(index).hnsw.efSearch = params['ef_search']
    elif index_type == 'ivf':
        faiss.extract_index_ivf(index).nprobe = params['nprobe']


def check_params(index: Any, index_type: str, params: Dict[str, Any]) -> Dict[str, Any]:
    """Check that ``params`` has exactly the index type's option keys, valid values, and agrees with ``index``."""
    keys = {'flat': (), 'hnsw': tuple(HNSW_DEFAULTS), 'ivf': IVF_KEYS}[index_type]
    if set(params) != set(keys):
        raise ValueError(f'params for index_type={index_type!r} must have keys {sorted(keys)}, got {params}')
    for key, value in params.items():
        if not (key == 'pq_m' and value is None):
            check_int(value, key)
    if index_type == 'hnsw':
        m = faiss.downcast_index(index).hnsw.nb_neighbors(1)  # layers above 0 keep M links per node
        if params['M'] != m:
            raise ValueError(f"params M={params['M']} but the faiss index has M={m}")
    if index_type == 'ivf':
        ivf = faiss.extract_index_ivf(index)
        if params['nlist'] != ivf.nlist:
            raise ValueError(f"params nlist={params['nlist']} but the faiss index has nlist={ivf.nlist}")
        if params['nprobe'] > ivf.nlist:
            raise ValueError(f"nprobe must be <= nlist ({ivf.nlist}), got {params['nprobe']}")
        pq = getattr(faiss.downcast_index(ivf), 'pq', None)
        actual = (None, params['pq_nbits']) if pq is None else (pq.M, pq.nbits)
        if (params['pq_m'], params['pq_nbits']) != actual:
            raise ValueError(f"params pq_m={params['pq_m']}, pq_nbits={params['pq_nbits']} but the faiss index "
                             f"has " + ('no PQ (IVF-Flat)' if pq is None else f'pq_m={pq.M}, pq_nbits={pq.nbits}'))
        if not index.is_trained:
            raise ValueError('the faiss IVF index is not trained: train it before wrapping it, or use '
                             'RetrievalIndex.build')
    return params


FAISS_CLASSES = {'flat': 'IndexFlat', 'hnsw': 'IndexHNSW', 'ivf': 'IndexIVF'}
