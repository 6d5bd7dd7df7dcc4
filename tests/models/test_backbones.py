"""Small representatives of many timm families: the stripped map doubles (or tokens are pooled) and gradients flow.

The full per-family picture, failures included, is benchmarks/results/backbone_coverage.md.
"""
import pytest
import torch

from cgd_heads import create_model
from cgd_heads.models.stride import feature_map_size

# real timm families at full size, one forward/backward each
pytestmark = pytest.mark.slow

# densenet121, regnetx_002, convnext_atto, mobilenetv2_100, tf_efficientnet_lite0 and resnets: tests/test_stride.py
# Hierarchical backbones with a spatial map: CNNs, hybrids, PVT-v2 (its attention's strided convs must be left
# alone) and Swin (NHWC; patch merging is run by shift-and-stitch).
HIERARCHICAL = ['mobilenetv3_small_050', 'ghostnet_050', 'vgg11', 'dla46_c', 'efficientnet_b0', 'mnasnet_050',
                'lcnet_050', 'hgnetv2_b0', 'efficientvit_b0', 'mobilevit_xxs', 'repvit_m1', 'resnest14d',
                'res2net50_14w_8s', 'rexnet_100', 'pvt_v2_b0', 'swin_tiny_patch4_window7_224']
TRANSFORMERS = [('swin_tiny_patch4_window7_224', 'NHWC', 0), ('test_vit', 'NLC', 1),
                ('deit_tiny_distilled_patch16_224', 'NLC', 2)]


def backward_reaches_backbone(model, size):
    model.train()
    embedding, logits = model.forward_train(torch.randn(2, *size))
    (embedding[:, 0].sum() + logits.logsumexp(1).sum()).backward()
    first = next(p for p in model.backbone.parameters() if p.requires_grad)
    return first.grad is not None and torch.isfinite(first.grad).all() and first.grad.abs().sum() > 0


@pytest.mark.parametrize('name', HIERARCHICAL)
def test_strip_doubles_the_map_and_trains(name):
    torch.manual_seed(0)
    size = (3, 224, 224)
    untouched = feature_map_size(create_model(name, embed_dim=24, stride_mode=None).backbone, size)
    model = create_model(name, embed_dim=24, num_classes=3, stride_mode='strip')
    stripped = feature_map_size(model.backbone, size)
    (c, h, w), (c2, h2, w2) = [s if model.head.input_fmt == 'NCHW' else (s[2], s[0], s[1])
                               for s in (untouched, stripped)]
    assert c2 == c and (h2, w2) == (2 * h, 2 * w)
    assert model.backbone.feature_info[-1]['reduction'] == 16
    assert backward_reaches_backbone(model, size)


@pytest.mark.parametrize('name, fmt, prefix', TRANSFORMERS)
def test_transformers_are_pooled_in_their_own_format(name, fmt, prefix):
    model = create_model(name, embed_dim=24, num_classes=3, stride_mode=None)
    assert model.head.input_fmt == fmt and model.head.num_prefix_tokens == prefix
    assert backward_reaches_backbone(model, model.pretrained_cfg['input_size'])
