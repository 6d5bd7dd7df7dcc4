"""Architecture B against its formula; head training on frozen features; the feature-map cache."""
import pytest
import torch
import torch.nn.functional as F

from cgd_heads.data import ImageList
from conftest import clustered_maps
from cgd_heads.training.feature_cache import cached_feature_maps, feature_cache_key
from cgd_heads.training.head_training import HeadTrainConfig, embed_features, train_head
from cgd_heads.retrieval.metrics import evaluate_retrieval
from cgd_heads.layers.variants import ConcatFCHead


def test_concat_fc_head_matches_formula():
    torch.manual_seed(0)
    head = ConcatFCHead(8, 'SM', embed_dim=6, num_classes=3).eval()
    x = torch.rand(2, 8, 3, 4)
    pooled = torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1)
    torch.testing.assert_close(head(x), F.normalize(pooled @ head.fc.weight.T, dim=1))
    emb, logits = head.forward_train(x)
    torch.testing.assert_close(logits, head.aux_head(x.mean((2, 3))))
    with pytest.raises(ValueError, match='ConcatFCHead'):
        head(torch.rand(2, 7, 3, 4))


@pytest.mark.parametrize('architecture', ['cgd', 'concat_fc', 'separate'])
def test_head_training_learns_on_unseen_classes(architecture):
    train_x, train_y = clustered_maps(16, 8, seed=0)
    test_x, test_y = clustered_maps(12, 8, seed=1)
    config = HeadTrainConfig(descriptors='SM', embed_dim=16, architecture=architecture, epochs=15, batch_size=32,
                             lr=3e-3)
    untrained = evaluate_retrieval(F.normalize(test_x.mean((2, 3)), dim=1), test_y)['map@r']
    trained = evaluate_retrieval(embed_features(train_head(config, train_x, train_y), test_x), test_y)['map@r']
    assert trained > untrained + 0.05, (untrained, trained)


def test_classification_only_and_bad_batches():
    x, y = clustered_maps(8, 4, seed=0)
    head = train_head(HeadTrainConfig(descriptors='G', embed_dim=8, ranking_weight=0.0, epochs=1, batch_size=16),
                      x, y)
    assert embed_features(head, x).shape == (32, 8)
    with pytest.raises(ValueError, match=r'at most \(classes present\) \* m_per_class = 8 \* 4'):
        train_head(HeadTrainConfig(embed_dim=8, batch_size=64), x, y)
    # ids with gaps (0, 2, 4, 6): the sampler sees 4 classes, not the 7 the largest id suggests
    with pytest.raises(ValueError, match=r'= 4 \* 4'):
        train_head(HeadTrainConfig(embed_dim=8, batch_size=20, m_per_class=4), x[:16], 2 * y[:16])
    with pytest.raises(ValueError, match='nothing to train'):
        HeadTrainConfig(ranking_weight=0.0, aux_weight=0.0)


class CountingBackbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)

    def forward_features(self, x):
        self.calls += 1
        return self.conv(x)


def test_feature_cache_computes_once_and_keys_on_content(shapes_folder, tmp_path):
    paths = sorted(str(p) for p in shapes_folder.rglob('*.png'))[:6]
    images = ImageList(paths, [0, 0, 0, 1, 1, 1], ['a', 'b'])
    config = {'mean': [0.5] * 3, 'std': [0.5] * 3, 'interpolation': 'bilinear', 'img_size': 16}
    backbone = CountingBackbone()
    first, labels = cached_feature_maps(backbone, images, config, {'model': 'x'}, cache_dir=tmp_path,
                                        num_workers=0, progress=False)
    again, _ = cached_feature_maps(backbone, images, config, {'model': 'x'}, cache_dir=tmp_path, num_workers=0,
                                   progress=False)
    assert backbone.calls == 1 and torch.equal(first, again) and first.dtype == torch.float16
    assert first.shape == (6, 4, 7, 7) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    with torch.no_grad():
        reference = backbone.conv(torch.stack([_eval_image(p, config) for p in paths]))
    torch.testing.assert_close(first.float(), reference, rtol=1e-2, atol=1e-2)
    other = ImageList(paths, [0, 0, 1, 1, 1, 1], ['a', 'b'])
    assert feature_cache_key({'model': 'x'}, images) != feature_cache_key({'model': 'x'}, other)
    assert feature_cache_key({'model': 'x'}, images) != feature_cache_key({'model': 'y'}, images)


def _eval_image(path, config):
    from cgd_heads.data import create_cgd_transform, load_rgb_image
    return create_cgd_transform(config, False, config['img_size'])(load_rgb_image(path))
