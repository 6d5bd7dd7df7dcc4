"""evaluate_retrieval against a brute-force torch loop, pytorch-metric-learning and a hand-computed example."""
import importlib
import sys
from typing import Dict, Optional, Sequence

import faiss
import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import FaissKNN

from cgd_heads.retrieval.metrics import SOP_KS, evaluate_retrieval


def clustered(sizes: Sequence[int], dim: int = 16, noise: float = 0.8, seed: int = 0):
    """Unit vectors scattered around one random centre per class; classes of the given sizes."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(sizes), dim, generator=g)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    x = centres[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return torch.nn.functional.normalize(x, dim=1), labels


def brute_force(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    ks: Sequence[int],
    gallery: Optional[torch.Tensor] = None,
    gallery_labels: Optional[torch.Tensor] = None,
    max_r: Optional[int] = None,
) -> Dict[str, float]:
    """Full float64 similarity matrix, stable argsort, and an explicit per-query loop over the definitions."""
    exclude_self = gallery is None
    if exclude_self:
        gallery, gallery_labels = queries, query_labels
    sim = queries.double() @ gallery.double().T
    recalls = {k: [] for k in ks}
    top1, aps, lone = [], [], 0
    for i in range(len(queries)):
        row = sim[i].clone()
        candidates = torch.ones(len(gallery), dtype=torch.bool)
        if exclude_self:
            candidates[i] = False
        order = torch.argsort(row[candidates], descending=True, stable=True)
        ranked_labels = gallery_labels[candidates][order]
        rel = (ranked_labels == query_labels[i]).tolist()
        r = sum(rel)
        if r == 0:
            lone += 1
            continue
        if max_r is not None:
            r = min(r, max_r)
        for k in ks:
            recalls[k].append(float(any(rel[:k])))
        top1.append(float(rel[0]))
        ap, hits = 0.0, 0
        for rank in range(1, r + 1):  # AP@R = (1/R) sum_{i <= R} P(i) rel(i), P(i) = hits in the top i / i
            if rel[rank - 1]:
                hits += 1
                ap += hits / rank
        aps.append(ap / r)
    out = {f'recall@{k}': sum(v) / len(v) for k, v in recalls.items()}
    out['precision@1'] = sum(top1) / len(top1)
    out['map@r'] = sum(aps) / len(aps)
    out['num_queries_without_positive'] = lone
    return out


def assert_matches(result: Dict[str, float], reference: Dict[str, float]) -> None:
    # 1e-6, not 1e-12: faiss ranks float32 scores, the reference float64 ones, so two items whose float32 scores
    # tie may swap, moving MAP@R by ~1e-9. Any real error moves a mean over < 2000 queries by >= 5e-4.
    assert set(reference) <= set(result)
    for key, value in reference.items():
        assert result[key] == pytest.approx(value, abs=1e-6), key
    if 'recall@1' in result:
        assert result['precision@1'] == result['recall@1']


SIZES = [2, 3, 5, 8, 13, 21, 1, 34, 4, 9]  # one singleton class: a query without any positive


class TestAgainstBruteForce:
    @pytest.mark.parametrize('ks', [(1,), (1, 2, 4, 8), (3, 10, 50)])
    def test_query_vs_rest(self, ks):
        x, y = clustered(SIZES)
        result = evaluate_retrieval(x, y, ks=ks)
        reference = brute_force(x, y, ks)
        assert 0.1 < reference['precision@1'] < 0.95, 'data must be neither trivial nor hopeless'
        assert_matches(result, reference)
        assert result['num_queries_without_positive'] == 1
        assert result['num_queries'] == len(x) - 1
        assert result['num_gallery'] == len(x)

    @pytest.mark.parametrize('ks', [(1, 2, 4, 8), (1, 10, 20, 30)])
    def test_query_vs_gallery(self, ks):
        x, y = clustered([12, 7, 20, 3, 15], noise=1.0, seed=1)
        rng = np.random.default_rng(1)
        is_query = torch.from_numpy(rng.random(len(x)) < 0.4)
        # a class that exists only among the queries: those queries have no positive in the gallery
        q_labels = torch.where(torch.arange(len(x)) < 3, torch.tensor(99), y)[is_query]
        q, g, g_labels = x[is_query], x[~is_query], y[~is_query]
        result = evaluate_retrieval(q, q_labels, ks=ks, gallery_embeddings=g, gallery_labels=g_labels)
        reference = brute_force(q, q_labels, ks, g, g_labels)
        assert_matches(result, reference)
        assert result['num_queries_without_positive'] == int((q_labels == 99).sum()) > 0
        assert result['num_gallery'] == len(g)

    def test_duplicates_and_ties(self):
        # exact copies (same label) tie at similarity 1 with their originals, and with the query itself
        x, y = clustered([6, 9, 4, 11], seed=2)
        dup = torch.tensor([0, 0, 0, 7, 7, 12, 20])
        x, y = torch.cat([x, x[dup]]), torch.cat([y, y[dup]])
        result = evaluate_retrieval(x, y, ks=(1, 2, 4))
        assert_matches(result, brute_force(x, y, (1, 2, 4)))

    def test_max_r_cap(self):
        x, y = clustered([3, 8, 12, 6], seed=3)
        result = evaluate_retrieval(x, y, ks=(1, 2), max_r=4)
        assert_matches(result, brute_force(x, y, (1, 2), max_r=4))
        # classes with R = size - 1 > 4: sizes 8, 12 and 6
        assert result['num_queries_r_capped'] == 8 + 12 + 6
        assert evaluate_retrieval(x, y, ks=(1, 2), max_r=None)['num_queries_r_capped'] == 0


class TestAgainstPML:
    @staticmethod
    def calculator() -> AccuracyCalculator:
        return AccuracyCalculator(
            include=('precision_at_1', 'mean_average_precision_at_r'),
            k='max_bin_count',
            knn_func=FaissKNN(index_init_fn=faiss.IndexFlatIP),
        )

    def test_query_vs_rest(self):
        x, y = clustered(SIZES, seed=4)
        pml = self.calculator().get_accuracy(x, y, x, y, ref_includes_query=True)
        result = evaluate_retrieval(x, y, ks=(1,))
        assert result['recall@1'] == pytest.approx(pml['precision_at_1'], abs=1e-6)
        assert result['map@r'] == pytest.approx(pml['mean_average_precision_at_r'], abs=1e-6)

    def test_query_vs_gallery(self):
        q, q_labels = clustered([5, 6, 7], seed=5)
        g, g_labels = clustered([10, 9, 8], seed=5)  # same seed: same class centres, fresh noise
        pml = self.calculator().get_accuracy(q, q_labels, g, g_labels, ref_includes_query=False)
        result = evaluate_retrieval(q, q_labels, ks=(1,), gallery_embeddings=g, gallery_labels=g_labels)
        assert result['recall@1'] == pytest.approx(pml['precision_at_1'], abs=1e-6)
        assert result['map@r'] == pytest.approx(pml['mean_average_precision_at_r'], abs=1e-6)


def circle(degrees: Sequence[float]) -> np.ndarray:
    a = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


class TestHandComputed:
    def test_six_points_on_a_circle(self):
        # cosine similarity falls with the angle, so each query's ranking is by angular distance:
        #   p0 (0, A):   p1 A, p2 B, p3 A, p4 B, p5   rel 1 0 1 0   R=2  AP@R = (1/2)(1/1)       = 0.5
        #   p1 (20, A):  p0 A, p2 B, p3 A, p4 B, p5   rel 1 0 1 0   R=2  AP@R                    = 0.5
        #   p2 (50, B):  p3 A, p1 A, p0 A, p4 B, p5   rel 0 0 0 1   R=1  AP@R                    = 0
        #   p3 (70, A):  p2 B, p4 B, p1 A, p0 A, p5   rel 0 0 1 1   R=2  AP@R (top 2 both wrong) = 0
        #   p4 (105, B): p3 A, p2 B, p1 A, p0 A, p5   rel 0 1 0 0   R=1  AP@R                    = 0
        #   p5 (220, C): the only C, no positive -> excluded from the means
        # Recall@1 = 2/5, @2 = 3/5, @3 = 4/5, @4 = 5/5; MAP@R = (0.5 + 0.5) / 5 = 0.2
        x = circle([0, 20, 50, 70, 105, 220])
        result = evaluate_retrieval(x, ['A', 'A', 'B', 'A', 'B', 'C'], ks=(1, 2, 3, 4))
        assert result == {
            'recall@1': pytest.approx(0.4), 'recall@2': pytest.approx(0.6), 'recall@3': pytest.approx(0.8),
            'recall@4': pytest.approx(1.0), 'precision@1': pytest.approx(0.4), 'map@r': pytest.approx(0.2),
            'num_queries': 5, 'num_queries_without_positive': 1, 'num_gallery': 6, 'num_queries_r_capped': 0,
        }

    def test_self_excluded_by_index_not_by_rank(self):
        # p0 and p1 are identical with different labels, so each ties at similarity 1 with the other and itself.
        # Dropping "the first result" instead of the query's own id would, for whichever of the two faiss lists
        # second, drop the twin and keep the query itself as its own (correct) nearest neighbour.
        #   p0 (0, A):  p1 B (1), p2 A (cos 50), p3 B     Recall@1 = 0, Recall@3 = 1, AP@R = 0 (R = 1)
        #   p1 (0, B):  p0 A (1), p2 A, p3 B              Recall@1 = 0, Recall@3 = 1, AP@R = 0
        #   p2 (50, A): p3 B (cos 10), p0/p1 tie          Recall@1 = 0, Recall@3 = 1, AP@R = 0
        #   p3 (60, B): p2 A (cos 10), p0/p1 tie          Recall@1 = 0, Recall@3 = 1, AP@R = 0
        x = circle([0, 0, 50, 60])
        result = evaluate_retrieval(x, [0, 1, 0, 1], ks=(1, 3))
        assert (result['recall@1'], result['recall@3'], result['map@r']) == (0.0, 1.0, 0.0)

    def test_gallery_protocol_by_hand(self):
        # query at 0 deg, label 1; gallery at 10 (0), 20 (1), 40 (1), 90 (1): ranks 1..4, rel 0 1 1 1, R = 3
        # Recall@1 = 0, Recall@2 = 1; AP@R = (1/3)(1/2 + 2/3) = 7/18
        result = evaluate_retrieval(
            circle([0]), [1], ks=(1, 2), gallery_embeddings=circle([10, 20, 40, 90]), gallery_labels=[0, 1, 1, 1]
        )
        assert result['recall@1'] == 0.0 and result['recall@2'] == 1.0
        assert result['map@r'] == pytest.approx(7 / 18)


class TestEquivalences:
    def test_chunked_equals_unchunked(self):
        x, y = clustered(SIZES, seed=6)
        full = evaluate_retrieval(x, y, ks=(1, 4, 16), chunk_size=100_000)
        for chunk in (1, 3, 17):
            assert evaluate_retrieval(x, y, ks=(1, 4, 16), chunk_size=chunk) == full

    def test_result_cap_shrinks_the_chunk_without_changing_results(self, monkeypatch):
        from cgd_heads.retrieval import metrics
        x, y = clustered(SIZES, seed=6)
        full = evaluate_retrieval(x, y, ks=(1, 4, 16))
        calls = []
        search = metrics._search_neighbours
        monkeypatch.setattr(metrics, '_search_neighbours', lambda index, q, *a: calls.append(len(q)) or
                            search(index, q, *a))
        monkeypatch.setattr(metrics, 'MAX_RESULTS_PER_CALL', 100)
        assert evaluate_retrieval(x, y, ks=(1, 4, 16)) == full
        k_c = max(16, max(SIZES) - 1) + 1  # the largest k_c of any query: max(ks) vs the largest R, + itself
        assert max(calls) == 100 // k_c and sum(calls) == len(x) - 1  # the singleton has no positive: not searched

    def test_torch_numpy_and_string_labels_agree(self):
        x, y = clustered(SIZES, seed=7)
        from_torch = evaluate_retrieval(x, y)
        assert evaluate_retrieval(x.numpy(), y.numpy()) == from_torch
        assert evaluate_retrieval(x.double(), [f'class{v}' for v in y.tolist()]) == from_torch

    def test_normalize_option(self):
        x, y = clustered(SIZES, seed=8)
        scaled = x * torch.linspace(0.5, 3.0, len(x))[:, None]
        with pytest.raises(ValueError, match='normalize=True'):
            evaluate_retrieval(scaled, y)
        assert evaluate_retrieval(scaled, y, normalize=True) == evaluate_retrieval(x, y)
        assert not torch.allclose(scaled.norm(dim=1), torch.ones(len(x))), 'input must not be modified in place'

    def test_sop_ks(self):
        x, y = clustered([600, 500], dim=8, seed=9)
        result = evaluate_retrieval(x, y, ks=SOP_KS)
        assert result['recall@1000'] == 1.0
        assert_matches(result, brute_force(x, y, SOP_KS))


class TestValidation:
    X = circle([0, 10, 20, 30])
    Y = [0, 0, 1, 1]

    @pytest.mark.parametrize('kwargs, error, match', [
        ({'embeddings': np.zeros((0, 4), np.float32), 'labels': []}, ValueError, 'non-empty'),
        ({'embeddings': np.ones(4, np.float32), 'labels': [0]}, ValueError, '2-D'),
        ({'embeddings': np.ones((4, 2), np.int64), 'labels': Y}, TypeError, 'floating dtype'),
        ({'labels': [0, 0, 1]}, ValueError, r'labels must have one entry per embedding \(4\), got 3'),
        ({'labels': [0.0, 0.0, 1.0, 1.0]}, TypeError, 'labels must hold ints or strs'),
        ({'ks': (0, 1)}, ValueError, 'ks must contain positive ints'),
        ({'ks': (1, 2.0)}, TypeError, 'ks must contain positive ints only, got float'),
        ({'ks': 1}, TypeError, 'ks must be a non-empty sequence'),
        ({'ks': ()}, TypeError, 'ks must be a non-empty sequence'),
        ({'ks': (1, 4)}, ValueError, r'ks must not exceed the 3 N - 1 other items.*K=4'),
        ({'chunk_size': 0}, ValueError, 'chunk_size must be a positive int'),
        ({'max_r': 0}, ValueError, 'max_r must be a positive int or None'),
        ({'gallery_embeddings': X}, ValueError, 'must be given together'),
        ({'gallery_embeddings': np.ones((2, 3), np.float32) / np.sqrt(3), 'gallery_labels': [0, 1]},
         ValueError, 'same dim as embeddings'),
        ({'gallery_embeddings': X, 'gallery_labels': ['0', '0', '1', '1']}, TypeError, 'both be ints or both'),
        ({'gallery_embeddings': X[:2], 'gallery_labels': [0, 0], 'ks': (3,)}, ValueError, 'gallery items'),
        ({'labels': [0, 1, 2, 3]}, ValueError, 'no query has a same-class item'),
        ({'embeddings': np.full((4, 2), np.nan, np.float32)}, ValueError, 'finite'),
    ])
    def test_bad_input(self, kwargs, error, match):
        args = {'embeddings': self.X, 'labels': self.Y, 'ks': (1,), **kwargs}
        with pytest.raises(error, match=match):
            evaluate_retrieval(**args)


def test_missing_faiss_fails_at_import(monkeypatch):
    monkeypatch.setitem(sys.modules, 'faiss', None)  # makes `import faiss` raise ImportError
    for name in ('cgd_heads.retrieval.faiss_import', 'cgd_heads.retrieval.metrics'):
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match='pip install faiss-cpu'):
        importlib.import_module('cgd_heads.retrieval.metrics')


def test_labels_mixing_ints_and_strs_or_int_kinds_are_not_merged():
    x = np.array([[1, 0], [0.99, 0.141], [0, 1], [0.141, 0.99]], np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with pytest.raises(TypeError, match='labels must hold only ints or only strs'):
        evaluate_retrieval(x, [1, '1', 2, '2'], ks=(1,))  # was: one class per pair, R@1 = MAP@R = 1
    # int64 + uint64 promote to float64 in numpy, which merges 2**53 and 2**53 + 1: compared as int64 now
    eye = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match='no query has a same-class item'):
        evaluate_retrieval(eye, np.array([2 ** 53 + 1] * 4, np.uint64), ks=(1,), gallery_embeddings=eye,
                           gallery_labels=np.array([2 ** 53, 7, 7, 7], np.int64))
    mixed = evaluate_retrieval(eye, np.array([3, 3, 4, 4], np.uint64), ks=(1,), gallery_embeddings=eye,
                               gallery_labels=np.array([3, 4, 4, 3], np.int64))
    assert mixed['recall@1'] == 0.5  # items 0 and 2 find their own class at rank 1


@pytest.mark.parametrize('flag', ['normalize', 'nmi'])
def test_yes_no_arguments_refuse_strings(flag):
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(TypeError, match=f"{flag} must be True or False, got str 'no'"):
        evaluate_retrieval(3 * x if flag == 'normalize' else x, [0, 0, 1, 1], ks=(1,), **{flag: 'no'})
