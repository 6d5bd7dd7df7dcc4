"""create_model / CGDModel: shapes, timm interface, weights loading and stride modes."""
import logging

import pytest
import timm
import torch
from safetensors.torch import save_file

from cgd_heads import CGDModel, create_model

ARCHS = ['test_resnet', 'test_convnext', 'test_efficientnet', 'resnet18', 'resnet50', 'convnext_atto',
         'tf_efficientnet_lite0']


@pytest.mark.parametrize('stride_mode', ['strip', 'dilate'])
@pytest.mark.parametrize('name', ARCHS)
def test_embedding_shape_norm_and_doubled_map(name, stride_mode):
    model = create_model(name, descriptors='SMG', embed_dim=48, num_classes=5, stride_mode=stride_mode)
    x = torch.randn(2, 3, 224, 224)
    assert model.forward_features(x).shape[-2:] == (14, 14)
    emb = model.eval()(x)
    assert emb.shape == (2, 48) and model.embed_dim == 48
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    emb_train, logits = model.train().forward_train(x)
    assert logits.shape == (2, 5) and emb_train.shape == (2, 48)
    assert model.num_features == model.backbone.num_features


def test_untouched_backbone_with_stride_mode_none():
    assert create_model('resnet18', stride_mode=None).forward_features(torch.randn(1, 3, 224, 224)).shape[-1] == 7


def test_dilate_uses_timm_output_stride_where_supported_and_generic_elsewhere(caplog):
    resnet = create_model('resnet18', stride_mode='dilate')
    assert resnet.backbone.layer4[1].conv1.dilation == (2, 2)
    with caplog.at_level(logging.INFO, logger='cgd_heads'):
        densenet = create_model('densenet121', stride_mode='dilate')
    assert 'does not support output_stride=16' in caplog.text
    assert densenet.forward_features(torch.randn(1, 3, 224, 224)).shape[-1] == 14


def test_timm_data_config_and_pretrained_cfg():
    model = create_model('resnet18')
    cfg = timm.data.resolve_model_data_config(model)
    assert cfg['input_size'] == (3, 224, 224) and cfg['mean'] == model.backbone.pretrained_cfg['mean']


def test_state_dict_roundtrip_gives_identical_outputs(tmp_path):
    model = create_model('test_resnet', descriptors='SG', embed_dim=32, num_classes=4, learnable_p=True).eval()
    torch.save(model.state_dict(), tmp_path / 'm.pth')
    clone = create_model('test_resnet', descriptors='SG', embed_dim=32, num_classes=4, learnable_p=True).eval()
    clone.load_state_dict(torch.load(tmp_path / 'm.pth', weights_only=True))
    x = torch.randn(2, 3, 160, 160)
    assert torch.equal(model(x), clone(x))


@pytest.mark.parametrize('fmt', ['pth', 'safetensors'])
def test_checkpoint_path_loads_plain_timm_weights_before_stripping(tmp_path, fmt):
    torch.manual_seed(1)
    timm_model = timm.create_model('resnet18', pretrained=False)  # with its 1000-class fc: keys are ignored
    state = {k: v.contiguous() for k, v in timm_model.state_dict().items()}
    path = tmp_path / f'resnet18.{fmt}'
    torch.save(state, path) if fmt == 'pth' else save_file(state, str(path))
    model = create_model('resnet18', checkpoint_path=path, stride_mode='strip')
    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    assert model.backbone.layer4[0].conv1.stride == (1, 1)


def test_checkpoint_path_loads_a_cgd_model(tmp_path):
    model = create_model('test_resnet', descriptors='SG', embed_dim=32, num_classes=4).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / 'cgd.safetensors'))
    clone = create_model('test_resnet', descriptors='SG', embed_dim=32, num_classes=4,
                         checkpoint_path=tmp_path / 'cgd.safetensors').eval()
    x = torch.randn(2, 3, 160, 160)
    assert torch.equal(model(x), clone(x))
    with pytest.raises(ValueError, match='shape mismatches'):
        create_model('test_resnet', descriptors='SMG', embed_dim=33, checkpoint_path=tmp_path / 'cgd.safetensors')


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    torch.save(timm.create_model('test_convnext').state_dict(), tmp_path / 'other.pth')
    with pytest.raises(ValueError, match='does not match the backbone'):
        create_model('test_resnet', checkpoint_path=tmp_path / 'other.pth')


def test_vit_pools_patch_tokens_and_skips_stripping(caplog):
    with caplog.at_level(logging.WARNING, logger='cgd_heads'):
        model = create_model('test_vit', descriptors='GM', embed_dim=32)
    assert 'no downsampling to strip' in caplog.text
    assert model.head.input_fmt == 'NLC' and model.head.num_prefix_tokens == model.backbone.num_prefix_tokens
    assert model.config['stride_mode'] is None
    assert model(torch.randn(2, 3, 160, 160)).shape == (2, 32)


def test_config_rebuilds_the_same_model():
    model = create_model('test_efficientnet', descriptors='GS', embed_dim=64, num_classes=3, gem_p=4.0,
                         temperature=1.0, drop_rate=0.1)
    assert isinstance(model, CGDModel)
    rebuilt = create_model(**model.config)
    assert rebuilt.config == model.config
    assert rebuilt.head.pools[0].p.item() == 4.0 and rebuilt.head.temperature == 1.0
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(model_name='resnet5O'), ValueError, "did you mean \\['resnet50'"),
    (dict(model_name='resnet18', stride_mode='half'), ValueError, 'stride_mode'),
    (dict(model_name='resnet18', embed_dim=100, descriptors='SMG'), ValueError, 'multiple of 3'),
    (dict(model_name='resnet18', global_pool='avg'), ValueError, 'global_pool'),
    (dict(model_name=None), TypeError, 'model_name'),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        create_model(**kwargs)


def test_timm_model_interface_heads_and_classifier():
    torch.manual_seed(0)
    model = create_model('test_resnet', embed_dim=16, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    features = model.forward_features(x)
    embedding, logits = model.forward_train(x)
    torch.testing.assert_close(model.forward_head(features, pre_logits=True), model(x))
    torch.testing.assert_close(model.forward_head(features), logits)  # timm's default: the classifier's logits
    assert model.get_classifier() is model.head.aux_head and logits.shape == (2, 5)
    model.reset_classifier(3)
    assert model.forward_head(features).shape == (2, 3) and model.config['num_classes'] == 3
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), torch.nn.Identity)
    torch.testing.assert_close(model.forward_head(features), embedding)  # no classifier: the embedding
    with pytest.raises(ValueError, match='global_pool'):
        model.reset_classifier(3, global_pool='avg')


def test_timm_optimizer_factory_with_layer_decay():
    """timm's create_optimizer_v2(model, layer_decay=...) on a CGD model: the backbone's own layer groups, scaled
    as timm scales the bare backbone, times one more decay step for the head on top; learnable p undecayed."""
    from timm.optim import create_optimizer_v2
    from timm.optim._param_groups import param_groups_layer_decay

    model = create_model('test_resnet', embed_dim=16, num_classes=5, learnable_p=True)
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scale = {id(p): g['lr_scale'] for g in optimizer.param_groups for p in g['params']}
    decay = {id(p): g['weight_decay'] for g in optimizer.param_groups for p in g['params']}
    assert sorted(scale) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    assert {scale[id(p)] for p in model.head.parameters()} == {1.0}
    bare = param_groups_layer_decay(model.backbone, weight_decay=0.05, layer_decay=0.75)
    reference = {id(p): g['lr_scale'] for g in bare for p in g['params']}
    for name, p in model.backbone.named_parameters():
        assert scale[id(p)] == pytest.approx(0.75 * reference[id(p)]), name
    assert len({scale[id(p)] for p in model.backbone.parameters()}) > 2  # really layer-wise
    p_name = next(n for n, _ in model.named_parameters() if n.endswith('.p'))
    assert p_name in model.no_weight_decay() and decay[id(model.get_parameter(p_name))] == 0.0


def test_timm_output_stride_is_not_changed_a_second_time():
    # output_stride=16 already dilates the last stage: stripping on top would give stride 8, silently
    with pytest.raises(ValueError, match="output_stride=16 .* with stride_mode='strip' would change the stride"):
        create_model('resnet18', output_stride=16)
    kept = create_model('resnet18', output_stride=16, stride_mode=None)
    assert kept.forward_features(torch.randn(1, 3, 64, 64)).shape[-1] == 64 // 16


def test_model_config_is_json_as_saved_and_compared():
    from cgd_heads.models.checkpoint import config_diff
    with pytest.raises(TypeError, match='act_layer=.* cannot be saved in the model config'):
        create_model('test_resnet', act_layer=torch.nn.ReLU)
    # a tuple argument is held as the list a reload reads, and compares equal to either
    model = create_model('test_vit', img_size=(32, 32), embed_dim=16)
    assert model.config['img_size'] == [32, 32]
    assert config_diff(dict(model.config, img_size=(32, 32)), model.config) == []
    assert config_diff({'img_size': (32, 16)}, {'img_size': [32, 32]}) == ['img_size: [32, 16] != [32, 32]']
    # NumPy integers pass the argument checks, and the config holds them as the numbers they are
    import numpy as np
    assert create_model('test_resnet', embed_dim=np.int64(16), num_classes=np.int64(3)).config['embed_dim'] == 16
