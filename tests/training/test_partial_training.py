"""train_partial: the tail and the head learn on cached trunk maps, the classifier's gradient reaches the tail."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cgd_heads.retrieval.metrics import evaluate_retrieval
from cgd_heads.training import HeadTrainConfig, PartialTrainConfig, embed_features, train_partial
from conftest import clustered_maps


def small_tail(kernel_size=1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(16, 24, kernel_size, padding=kernel_size // 2), nn.BatchNorm2d(24), nn.ReLU())


def test_partial_training_learns_on_unseen_classes():
    train_x, train_y = clustered_maps(16, 8, seed=0)
    test_x, test_y = clustered_maps(12, 8, seed=1)
    config = PartialTrainConfig(descriptors='SG', embed_dim=16, epochs=15, batch_size=32, lr=3e-3)
    untrained = small_tail().eval()
    with torch.no_grad():
        before = evaluate_retrieval(F.normalize(untrained(test_x).mean((2, 3)), dim=1), test_y)['map@r']
    model = train_partial(config, small_tail(), train_x, train_y)
    after = evaluate_retrieval(embed_features(model, test_x), test_y)['map@r']
    assert after > before + 0.05, (before, after)
    assert not model.training and embed_features(model, test_x).shape == (len(test_y), 16)


@pytest.mark.parametrize('freeze_bn', [True, False])
def test_the_classifier_alone_moves_the_tail_and_frozen_batch_norm_keeps_its_statistics(freeze_bn):
    x, y = clustered_maps(8, 4, seed=0)
    tail = small_tail()
    start = copy.deepcopy(tail.state_dict())
    config = PartialTrainConfig(descriptors='G', embed_dim=8, ranking_weight=0.0, epochs=1, batch_size=16,
                                freeze_bn=freeze_bn)
    train_partial(config, tail, x, y)
    # classification loss only: any change of the tail's weights came through the auxiliary classifier
    assert not torch.equal(tail[0].weight, start['0.weight'])
    stats_kept = torch.equal(tail[1].running_mean, start['1.running_mean'])
    assert stats_kept == freeze_bn


def test_runs_repeat_exactly_and_flip_changes_the_batches():
    x, y = clustered_maps(8, 4, seed=0)
    # a 3x3 conv: mirroring its input changes what it learns (a 1x1 conv + global pooling is mirror-invariant)
    config = PartialTrainConfig(descriptors='SG', embed_dim=8, epochs=2, batch_size=16)
    first = embed_features(train_partial(config, small_tail(3), x, y), x)
    again = embed_features(train_partial(config, small_tail(3), x, y), x)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    unflipped = PartialTrainConfig(descriptors='SG', embed_dim=8, epochs=2, batch_size=16, flip=False)
    difference = (first - embed_features(train_partial(unflipped, small_tail(3), x, y), x)).abs().max()
    assert difference > 1e-4, difference


class RecordingTail(nn.Module):
    """A 1x1 conv that keeps the batches it was given."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 1)
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.conv(x)


@pytest.mark.parametrize('input_fmt', ['NCHW', 'NHWC'])
def test_flip_mirrors_the_width_axis_of_the_maps(monkeypatch, input_fmt):
    x, y = clustered_maps(4, 4, seed=0)
    if input_fmt == 'NHWC':
        x = x.permute(0, 2, 3, 1).contiguous()
        tail = nn.Sequential()  # identity: the head pools NHWC maps directly
        recorder = []
        tail.register_forward_pre_hook(lambda module, args: recorder.append(args[0].clone()))
    else:
        tail = RecordingTail()
        recorder = tail.inputs
    monkeypatch.setattr(torch, 'rand', lambda n, *a, **k: torch.zeros(n))  # every map is mirrored
    config = PartialTrainConfig(descriptors='G', embed_dim=8, epochs=1, batch_size=16, flip=True)
    if input_fmt == 'NHWC':
        with pytest.raises(ValueError, match='requires_grad'):  # an identity tail has nothing to train
            train_partial(config, tail, x, y, input_fmt=input_fmt)
        tail = nn.Sequential(nn.Identity(), nn.LayerNorm(16))  # trainable, keeps NHWC
        tail.register_forward_pre_hook(lambda module, args: recorder.append(args[0].clone()))
    train_partial(config, tail, x, y, input_fmt=input_fmt)
    width = 3 if input_fmt == 'NCHW' else 2
    seen = torch.cat(recorder[1:])  # the first call is the probe for the head's width (unflipped)
    originals = {tuple(m.flatten().tolist()) for m in x.flip(width)}
    assert all(tuple(m.flatten().tolist()) in originals for m in seen)  # each one a width-mirrored map


def test_a_learnable_p_moves():
    x, y = clustered_maps(8, 4, seed=0)
    model = train_partial(PartialTrainConfig(descriptors='G', embed_dim=8, epochs=3, batch_size=16, lr=1e-2,
                                             learnable_p=True), small_tail(), x, y)
    p = [v for k, v in model.named_parameters() if k.endswith('.p')]
    assert p and not torch.allclose(p[0], torch.full_like(p[0], 3.0))


def test_settings_and_inputs_are_checked():
    x, y = clustered_maps(8, 4, seed=0)
    PartialTrainConfig(learnable_p=True)  # pooled every step, so p can learn
    with pytest.raises(ValueError, match='learnable_p=True cannot be trained on cached features'):
        HeadTrainConfig(learnable_p=True)
    with pytest.raises(ValueError, match='head_lr must be > 0'):
        PartialTrainConfig(head_lr=0.0)
    with pytest.raises(ValueError, match=r'trunk maps \(N, C, H, W\)'):
        train_partial(PartialTrainConfig(batch_size=16), small_tail(), x.mean((2, 3)), y)
    with pytest.raises(ValueError, match=r'at most \(classes present\) \* m_per_class'):
        train_partial(PartialTrainConfig(batch_size=64), small_tail(), x, y)
    with pytest.raises(ValueError, match='one row per image'):
        train_partial(PartialTrainConfig(batch_size=16), small_tail(), x, y[:-1])
    with pytest.raises(ValueError, match="input_fmt must be 'NCHW' or 'NHWC'"):
        train_partial(PartialTrainConfig(batch_size=16), small_tail(), x, y, input_fmt='NLC')
    frozen = small_tail().requires_grad_(False)
    with pytest.raises(ValueError, match='tail has no parameter with requires_grad=True'):
        train_partial(PartialTrainConfig(batch_size=16), frozen, x, y)
    with pytest.raises(ValueError, match="learnable_p=True needs architecture 'cgd' or 'separate'"):
        PartialTrainConfig(learnable_p=True, architecture='concat_fc')
