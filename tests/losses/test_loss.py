"""CGDLoss against a hand computation of batch-hard triplet (all-anchor mean) + label-smoothed CE."""
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners

from cgd_heads import AuxSoftmaxHead, CGDLoss


def hand_batch_hard(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    terms = []
    for a in range(len(labels)):
        pos = [i for i in range(len(labels)) if i != a and labels[i] == labels[a]]
        neg = [i for i in range(len(labels)) if labels[i] != labels[a]]
        if not pos or not neg:
            continue
        hardest_pos = max(float(torch.dist(embeddings[a], embeddings[i])) for i in pos)
        hardest_neg = min(float(torch.dist(embeddings[a], embeddings[i])) for i in neg)
        terms.append(max(0.0, hardest_pos - hardest_neg + margin))
    return torch.tensor(sum(terms) / len(terms))


@pytest.mark.parametrize('margin', [0.1, 0.5])
def test_ranking_loss_equals_hand_batch_hard(margin):
    torch.manual_seed(0)
    embeddings = F.normalize(torch.randn(12, 8), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    loss = CGDLoss(margin=margin)(embeddings, labels)
    torch.testing.assert_close(loss, hand_batch_hard(embeddings, labels, margin), rtol=1e-5, atol=1e-6)


def test_mean_over_all_anchors_not_only_nonzero():
    # Two well separated classes except one anchor: PML's default reducer would average only the violators.
    embeddings = F.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99], [0.7, 0.7]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1])
    loss = CGDLoss(margin=0.1)(embeddings, labels)
    torch.testing.assert_close(loss, hand_batch_hard(embeddings, labels, 0.1), rtol=1e-5, atol=1e-6)
    nonzero_avg = losses.TripletMarginLoss(margin=0.1)(embeddings, labels, miners.BatchHardMiner()(embeddings, labels))
    assert loss < nonzero_avg


def test_total_adds_weighted_classification_and_records_parts():
    torch.manual_seed(0)
    embeddings = F.normalize(torch.randn(8, 4), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    aux = AuxSoftmaxHead(6, 4, label_smoothing=0.2)
    logits = aux(torch.randn(8, 6))
    criterion = CGDLoss(margin=0.1, aux_weight=0.5, aux_loss=aux.loss)
    total = criterion(embeddings, labels, logits)
    ce = F.cross_entropy(logits, labels, label_smoothing=0.2)
    torch.testing.assert_close(total, hand_batch_hard(embeddings, labels, 0.1) + 0.5 * ce, rtol=1e-5, atol=1e-6)
    assert set(criterion.last_parts) == {'ranking', 'classification', 'total'}
    torch.testing.assert_close(criterion.last_parts['classification'], ce.detach())


def test_default_classification_is_label_smoothed_ce():
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    embeddings = F.normalize(torch.randn(4, 5), dim=1)
    criterion = CGDLoss()
    total = criterion(embeddings, labels, logits)
    # the defaults: margin 0.1 and smoothing 0.1, both parts recomputed by hand (not read back from last_parts)
    torch.testing.assert_close(total, hand_batch_hard(embeddings, labels, 0.1)
                               + F.cross_entropy(logits, labels, label_smoothing=0.1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('labels', [torch.tensor([0, 0, 0, 0]), torch.tensor([3])])
def test_degenerate_batches_are_finite_with_finite_gradients(labels):
    embeddings = F.normalize(torch.randn(len(labels), 4), dim=1).requires_grad_()
    logits = torch.randn(len(labels), 5, requires_grad=True)
    loss = CGDLoss()(embeddings, labels, logits)
    # no triplet exists (one class, or one image): the ranking part is 0 and the loss is the classifier's alone
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, label_smoothing=0.1))
    loss.backward()
    assert torch.isfinite(embeddings.grad).all() and torch.isfinite(logits.grad).all()


def test_identical_embeddings_are_finite():
    embeddings = F.normalize(torch.ones(6, 4), dim=1).requires_grad_()
    loss = CGDLoss(margin=0.1)(embeddings, torch.tensor([0, 0, 1, 1, 2, 2]))
    torch.testing.assert_close(loss, torch.tensor(0.1))
    loss.backward()
    assert torch.isfinite(embeddings.grad).all()


def test_custom_pml_loss_and_miner():
    embeddings = F.normalize(torch.randn(8, 4), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    contrastive = losses.ContrastiveLoss()
    assert CGDLoss(metric_loss=contrastive).miner is None
    torch.testing.assert_close(CGDLoss(metric_loss=contrastive)(embeddings, labels), contrastive(embeddings, labels))
    miner = miners.MultiSimilarityMiner()
    torch.testing.assert_close(CGDLoss(metric_loss=contrastive, miner=miner)(embeddings, labels),
                               contrastive(embeddings, labels, miner(embeddings, labels)))


@pytest.mark.parametrize('kwargs, match', [
    (dict(margin=0), 'margin'), (dict(margin=-0.1), 'margin'), (dict(aux_weight=-1), 'aux_weight'),
    (dict(metric_loss='triplet'), 'metric_loss'), (dict(aux_loss=3), 'aux_loss'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        CGDLoss(**kwargs)


def test_bad_labels():
    embeddings = F.normalize(torch.randn(4, 4), dim=1)
    with pytest.raises(ValueError, match=r'shape \(4,\)'):
        CGDLoss()(embeddings, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match='integer'):
        CGDLoss()(embeddings, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match=r'class ids in \[0, 3\)'):
        CGDLoss()(embeddings, torch.tensor([0, 1, 2, 3]), torch.randn(4, 3))


def test_default_classification_loss_takes_the_smoothing_given():
    torch.manual_seed(0)
    embeddings = F.normalize(torch.randn(8, 4), dim=1)
    labels, logits = torch.arange(4).repeat(2), torch.randn(8, 4)
    for smoothing, expected in ((None, 0.1), (0.0, 0.0), (0.3, 0.3)):
        criterion = CGDLoss(ranking_weight=0.0, label_smoothing=smoothing)
        assert criterion(embeddings, labels, logits) == pytest.approx(
            float(F.cross_entropy(logits, labels, label_smoothing=expected)), abs=1e-6)
    # two sources of the smoothing are refused rather than one silently winning
    with pytest.raises(ValueError, match='label_smoothing applies to the default cross-entropy only'):
        CGDLoss(aux_loss=AuxSoftmaxHead(4, 4, label_smoothing=0.0).loss, label_smoothing=0.0)


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(margin='0.1'), TypeError, 'margin'), (dict(margin=float('inf')), ValueError, 'margin'),
    (dict(aux_weight='1'), TypeError, 'aux_weight'), (dict(label_smoothing=1.0), ValueError, 'label_smoothing'),
])
def test_loss_arguments_of_the_wrong_type_or_range(kwargs, error, match):
    with pytest.raises(error, match=match):
        CGDLoss(**kwargs)


def test_embeddings_that_are_not_a_tensor_raise_a_type_error():
    with pytest.raises(TypeError, match='embeddings must be a \\(N, D\\) tensor, got list'):
        CGDLoss()([[0.0, 1.0]] * 4, torch.arange(4))
