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


class PatchMerge(nn.Module):
    """Swin-style patch merging (NHWC): each 2x2 neighbourhood is flattened into channels and projected."""

    def __init__(self, channels: int):
        super().__init__()
        self.reduction = nn.Linear(4 * channels, 2 * channels, bias=False)

    def forward(self, x):
        n, h, w, c = x.shape
        x = x.reshape(n, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(x)


class MergingNet(nn.Module):
    output_fmt = 'NHWC'

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 4, stride=4)
        self.merge = PatchMerge(4)

    def forward_features(self, x):
        return self.merge(self.stem(x).permute(0, 2, 3, 1))


def test_patch_merging_is_run_at_stride_one_by_shift_and_stitch():
    torch.manual_seed(0)
    model = MergingNet().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.stem(x).permute(0, 2, 3, 1)  # (2, 8, 8, 4) enters the merging
        before = {k: v.clone() for k, v in model.state_dict().items()}
        strip_last_stride(model, input_size=(3, 32, 32))
        out = model.forward_features(x)
    assert out.shape == (2, 8, 8, 8)  # 4x4 -> 8x8, NHWC
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Naive stride-1 merging: the 2x2 neighbourhood starting at every pixel, right/bottom edge replicated.
    padded = F.pad(tokens.permute(0, 3, 1, 2), (0, 1, 0, 1), mode='replicate').permute(0, 2, 3, 1)
    weight = model.merge.reduction.weight
    for i in range(8):
        for j in range(8):
            patch = torch.cat([padded[:, i + di, j + dj] for dj in (0, 1) for di in (0, 1)], dim=-1)
            torch.testing.assert_close(out[:, i, j], patch @ weight.T)


class FunctionalPoolBlock(nn.Module):
    """An Inception-style reduction: a strided conv next to a functional pool (no pool module to change)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x):
        return torch.cat([self.conv(x), F.max_pool2d(x, 3, stride=2, padding=1)], 1)


class FunctionalPoolNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.reduce = FunctionalPoolBlock()
        self.head_conv = nn.Conv2d(16, 16, 3, padding=1)

    def forward_features(self, x):
        return self.head_conv(self.reduce(self.stem(x)))


@pytest.mark.parametrize('mode', ['strip', 'dilate'])
def test_block_with_a_functional_pool_is_stitched(mode):
    torch.manual_seed(0)
    model = FunctionalPoolNet().eval()
    x = torch.randn(2, 3, 32, 32)
    strip_last_stride(model, mode, input_size=(3, 32, 32))
    assert model.reduce.conv.stride == (2, 2)  # the block runs unchanged on shifted copies
    with torch.no_grad():
        stem = model.stem(x)
        got = model.reduce(stem)
        dense = torch.cat([F.conv2d(stem, model.reduce.conv.weight, model.reduce.conv.bias, padding=1),
                           F.max_pool2d(stem, 3, stride=1, padding=1)], 1)
        assert got.shape == dense.shape == (2, 16, 16, 16)
        # equal to the block at stride 1 away from the border: a copy shifted by one meets the zero padding at
        # output row/column 1 where the dense block still sees row 0, and the last row is replicated, not zero
        torch.testing.assert_close(got[..., 2:-1, 2:-1], dense[..., 2:-1, 2:-1])
        assert not torch.allclose(got[..., 1, 2:-1], dense[..., 1, 2:-1])  # the documented border effect
        assert model.forward_features(x).shape == (2, 16, 16, 16)
    assert model.head_conv.dilation == ((2, 2) if mode == 'dilate' else (1, 1))


class OneConv(nn.Module):
    def __init__(self, padding: int):
        super().__init__()
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=padding)

    def forward_features(self, x):
        return self.down(x)


@pytest.mark.parametrize('padding', [0, 1])
def test_strip_doubles_exactly_at_every_input_size(padding):
    """H -> o at stride 2 becomes H -> 2 o at whatever size the model is later called with: Inception's unpadded
    3x3 (18 -> 8 -> 16, 17 -> 8 -> 16) and odd maps of a padded one (15 -> 8 -> 16)."""
    torch.manual_seed(0)
    model = OneConv(padding)
    strip_last_stride(model, input_size=(8, 16, 16))  # traced at one size, used at others
    for size in (14, 15, 16, 17, 18):
        x = torch.randn(1, 8, size, size)
        old = F.conv2d(x, model.down.weight, model.down.bias, stride=2, padding=padding).shape[-1]
        total = 2 * old + 2 - size  # the stride-1 padding that gives 2 o, the odd pixel on the right/bottom
        reference = F.conv2d(F.pad(x, (total // 2, total - total // 2) * 2), model.down.weight, model.down.bias)
        with torch.no_grad():
            torch.testing.assert_close(model.forward_features(x), reference)
        assert reference.shape[-1] == 2 * old


def test_stripped_cnn_doubles_at_other_input_sizes():
    model = backbone('resnet18').eval()
    untouched = {s: feature_map_size(model, (3, s, s))[1] for s in (160, 200, 225)}
    strip_last_stride(model, input_size=SIZE)
    assert {s: feature_map_size(model, (3, s, s))[1] for s in untouched} == {s: 2 * v for s, v in untouched.items()}
