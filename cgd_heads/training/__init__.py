"""Training: end to end (``train`` with m-per-class batches, validation-based selection, resume, ``torchrun``), and
head-only on cached backbone feature maps (the benchmarks' fast tier), and the last stage(s) + head on cached trunk
maps (the partial tier)."""
from .config import OPTIMIZERS, SCHEDULES, SELECT_METRICS, HeadSettings, TrainConfig
from .feature_cache import cached_feature_maps, feature_cache_key
from .head_training import ARCHITECTURES, HeadTrainConfig, build_head, embed_features, train_head
from .partial_training import PartialTrainConfig, train_partial
from .recipes import RECIPES, recipe_config, recipe_overrides, recipe_settings, resolve_recipe
from .reference import off_the_shelf_reference, reference_verdict
from .trainer import TrainResult, build_model, freeze_batch_norm, train
from .validation import validate

__all__ = ['ARCHITECTURES', 'HeadSettings', 'HeadTrainConfig', 'OPTIMIZERS', 'PartialTrainConfig', 'RECIPES',
           'SCHEDULES', 'SELECT_METRICS', 'TrainConfig', 'TrainResult', 'build_head', 'build_model',
           'cached_feature_maps', 'embed_features', 'feature_cache_key', 'freeze_batch_norm', 'off_the_shelf_reference',
           'recipe_config', 'recipe_overrides', 'recipe_settings', 'reference_verdict', 'resolve_recipe', 'train',
           'train_head', 'train_partial', 'validate']
