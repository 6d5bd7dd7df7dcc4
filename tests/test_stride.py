"""strip_last_stride: the final map doubles, only strides/paddings/dilations change, timm's dilation is matched."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from cgd_heads import feature_map_size, strip_last_stride

# timm's tiny test architectures plus small members of the families the CGD paper and its users rely on.
ARCHS = ['test_resnet', 'test_convnext', 'test_efficientnet', 'resnet18', 'resnet50', 'convnext_atto',
         'tf_efficientnet_lite0', 'mobilenetv2_100', 'densenet121', 'regnetx_002']
SIZE = (3, 224, 224)


def backbone(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=0, global_pool='')


@pytest.mark.parametrize('mode', ['strip', 'dilate'])
@pytest.mark.parametrize('name', ARCHS)
def test_final_map_doubles_and_weights_are_untouched(name, mode):
    model = backbone(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    channels, h, w = feature_map_size(model, SIZE)
    assert (h, w) == (7, 7)
    strip_last_stride(model, mode, input_size=SIZE)
    assert feature_map_size(model, SIZE) == (channels, 14, 14)
    assert model.feature_info[-1]['reduction'] == 16
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.train()
    out = model.forward_features(torch.randn(2, *SIZE))
    out.mean().backward()
    last_stage = model.get_submodule(model.feature_info[-1]['module'])
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in last_stage.parameters())


@pytest.mark.parametrize('name', ['resnet18', 'test_efficientnet', 'convnext_atto', 'regnetx_002'])
def test_generic_dilation_equals_timm_output_stride_16(name):
    ours = backbone(name).eval()
    reference = timm.create_model(name, pretrained=False, num_classes=0, output_stride=16).eval()
    reference.load_state_dict(ours.state_dict())
    strip_last_stride(ours, 'dilate')
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), reference.forward_features(x))


def test_strip_is_a_stride_one_convolution():
    model = backbone('resnet18').eval()
    conv = model.layer4[0].conv1
    weight = conv.weight.detach().clone()
    strip_last_stride(model, 'strip')
    x = torch.randn(1, 256, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), F.conv2d(x, weight, stride=1, padding=1))
    assert conv.dilation == (1, 1) and model.layer4[1].conv1.dilation == (1, 1)


def test_even_kernel_downsample_pads_right_and_bottom():
    model = backbone('convnext_atto').eval()
    conv = model.stages[3].downsample[1]
    assert conv.kernel_size == (2, 2) and conv.stride == (2, 2)
    strip_last_stride(model, 'strip')
    x = torch.randn(1, conv.in_channels, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, conv.bias))


def test_even_kernel_average_pool_keeps_size():
    model = backbone('densenet121').eval()  # transitions downsample with a 2x2 average pool
    strip_last_stride(model, 'strip')
    pool = model.features.transition3.pool
    x = torch.randn(1, 3, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(pool(x), F.avg_pool2d(F.pad(x, (0, 1, 0, 1), mode='replicate'), 2, stride=1))


def test_token_backbone_has_nothing_to_strip():
    model = timm.create_model('test_vit', pretrained=False, num_classes=0)
    with pytest.raises(ValueError, match='stride_mode=None'):
        strip_last_stride(model)


class FunctionalDownsample(nn.Module):
    """Its last downsampling is a strided conv in parallel with a functional pool: cannot be stripped."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward_features(self, x):
        x = self.stem(x)
        return self.down(x) + F.avg_pool2d(x, 2)


def test_failed_strip_leaves_the_model_unchanged():
    model = FunctionalDownsample()
    with pytest.raises(ValueError, match='model left unchanged'):
        strip_last_stride(model, input_size=(3, 32, 32))
    assert model.down.stride == (2, 2) and model.down.padding == (1, 1)
    assert feature_map_size(model, (3, 32, 32)) == (8, 8, 8)


def test_bad_mode():
    with pytest.raises(ValueError, match="mode must be one of \\('strip', 'dilate'\\)"):
        strip_last_stride(backbone('test_resnet'), mode='remove')
