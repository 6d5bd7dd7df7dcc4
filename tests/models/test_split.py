"""split_backbone: the trunk and tail chained give timm's own forward_features, and what cannot be cut is refused."""
import pytest
import torch

from cgd_heads import create_model
from cgd_heads.models import split_backbone


@pytest.mark.parametrize('model_name, stages', [('test_efficientnet', 5), ('test_resnet', 4), ('test_convnext', 4)])
@pytest.mark.parametrize('trainable_stages', [1, 2])
def test_trunk_then_tail_equals_forward_features(model_name, stages, trainable_stages):
    backbone = create_model(model_name, embed_dim=8).backbone.eval()  # stride stripped, as training uses it
    trunk, tail = split_backbone(backbone, trainable_stages)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tail(trunk(x)), backbone.forward_features(x), rtol=1e-4, atol=1e-5)
    # the halves hold (not copy) exactly the parameters forward_features uses, none in both halves
    backbone.zero_grad(set_to_none=True)
    backbone.forward_features(x).sum().backward()
    used = {id(p) for p in backbone.parameters() if p.grad is not None}
    halves = [id(p) for p in list(trunk.parameters()) + list(tail.parameters())]
    assert set(halves) == used and len(halves) == len(used)
    # the tail starts at the last `trainable_stages` stages: one more stage moves parameters out of the trunk
    if trainable_stages == 1:
        _, longer = split_backbone(backbone, 2)
        assert sum(p.numel() for p in longer.parameters()) > sum(p.numel() for p in tail.parameters())
    with pytest.raises(ValueError, match=f'between 1 and {stages - 1}'):
        split_backbone(backbone, stages)


def test_bad_arguments_and_backbones_that_are_not_a_chain_are_refused():
    backbone = create_model('test_resnet', embed_dim=8).backbone
    with pytest.raises(ValueError, match='between 1 and 3'):
        split_backbone(backbone, 0)
    with pytest.raises(TypeError, match='trainable_stages must be an int'):
        split_backbone(backbone, 1.5)
    vit = create_model('test_vit', embed_dim=8).backbone  # position embeddings are added between the children
    with pytest.raises(ValueError, match='not a plain chain'):
        split_backbone(vit, 1)
    fixed_size = create_model('vit_tiny_patch16_224', embed_dim=8).backbone  # timm asserts its input size
    with pytest.raises(ValueError, match='not a plain chain'):
        split_backbone(fixed_size, 1)
    with pytest.raises(ValueError, match='no stages'):
        split_backbone(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), 1)
