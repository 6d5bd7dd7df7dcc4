"""The paper's layers: generalized-mean pooling, the CGD head with its auxiliary classifier, and the head the paper
compares against (architecture B). They take feature maps and know nothing of backbones, files or training."""
from .heads import COMBINE_MODES, DESCRIPTOR_LETTERS, AuxSoftmaxHead, CGDHead, parse_descriptors, prepare_features
from .pooling import INPUT_FORMATS, GeneralizedPooling, generalized_mean
from .variants import ConcatFCHead

__all__ = ['AuxSoftmaxHead', 'CGDHead', 'COMBINE_MODES', 'ConcatFCHead', 'DESCRIPTOR_LETTERS', 'GeneralizedPooling',
           'INPUT_FORMATS', 'generalized_mean', 'parse_descriptors', 'prepare_features']
