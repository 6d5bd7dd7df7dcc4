"""A timm backbone made into a CGD retrieval model: the last stride removed, the head attached, weights loaded
from pip packages or local files, checkpoints written and read without pickle, ONNX export."""
from .backbone import BackboneFeatures, create_backbone
from .cgd_model import HEAD_KWARGS, CGDModel, create_model, load_pretrained
from .checkpoint import config_diff, load_config, load_training_state, load_weights, save_pretrained
from .export import export_onnx, verify_onnx
from .off_the_shelf import OffTheShelfModel, create_off_the_shelf
from .split import split_backbone
from .stride import STRIDE_MODES, feature_map_size, strip_last_stride
from .weights import PIP_WEIGHTS, load_pip_weights

__all__ = ['BackboneFeatures', 'CGDModel', 'HEAD_KWARGS', 'OffTheShelfModel', 'PIP_WEIGHTS', 'STRIDE_MODES',
           'config_diff', 'create_backbone', 'create_model', 'create_off_the_shelf', 'export_onnx', 'feature_map_size',
           'load_config', 'load_pip_weights',
           'load_pretrained', 'load_training_state', 'load_weights', 'save_pretrained', 'split_backbone',
           'strip_last_stride', 'verify_onnx']
