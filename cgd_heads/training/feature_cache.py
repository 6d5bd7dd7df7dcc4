"""Backbone feature maps computed once and kept on disk, for experiments that train only the heads.

Training a head on frozen features is orders of magnitude cheaper than fine-tuning: the backbone runs once per
image instead of once per image and epoch. The benchmarks' fast tier uses it for large grids of head
configurations. Maps are stored in float16 safetensors files under a cache folder (never beside the data), keyed by
a hash of everything that determines them: model config, weights source, image size, and the image list.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import ImageDataset, ImageList, cache_root, create_cgd_transform
from ..utils.atomic import atomic_path
from ..utils.checks import PathLike
from ..utils.runtime import resolve_device

__all__ = ['cached_feature_maps', 'feature_cache_key']

_logger = logging.getLogger(__name__)


def feature_cache_key(description: Dict[str, Any], image_list: ImageList) -> str:
    """Hash of a JSON description (model, weights, sizes) and the exact images (paths, labels, boxes)."""
    digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode())
    for path, label in zip(image_list.paths, image_list.labels):
        digest.update(f'{path}\0{label}\n'.encode())
    if image_list.boxes is not None:
        digest.update(json.dumps(image_list.boxes).encode())
    return digest.hexdigest()[:24]


@torch.no_grad()
def cached_feature_maps(
        backbone: torch.nn.Module,
        image_list: ImageList,
        data_config: Dict[str, Any],
        description: Dict[str, Any],
        cache_dir: Optional[PathLike] = None,
        batch_size: int = 64,
        device: Union[str, torch.device, None] = 'auto',
        num_workers: int = 2,
        progress: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``backbone.forward_features`` of every image (eval transform), computed once and cached.

    Args:
        backbone: The (frozen) feature extractor, e.g. ``create_model(...).backbone``, or any module whose call
            gives the maps (the trunk of :func:`cgd_heads.models.split_backbone`).
        image_list: The images.
        data_config: Preprocessing (mean, std, interpolation, img_size), see :func:`cgd_heads.data.data_config_of`.
        description: What identifies the backbone and its weights (e.g. the model config plus the weights source);
            part of the cache key together with ``data_config`` and the images.
        cache_dir: Cache folder; default ``$CGD_HEADS_CACHE/feature_maps`` (``~/.cache/cgd_heads``).
        batch_size, device, num_workers, progress: Extraction settings (not part of the key).

    Returns:
        ``(features, labels)``: float16 ``(N, ...)`` maps exactly as ``forward_features`` returns them, int64 labels.
    """
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / 'feature_maps'
    key = feature_cache_key(dict(description, data=data_config), image_list)
    path = folder / f'{key}.safetensors'
    if path.is_file():
        try:
            tensors = load_file(str(path))
            if tensors['features'].shape[0] == len(image_list):
                return tensors['features'], tensors['labels']
        except (SafetensorError, OSError, KeyError) as e:
            _logger.warning('ignoring unreadable feature cache %s (%s); recomputing', path, e)
    device = resolve_device(device)
    backbone.eval().to(device)
    dataset = ImageDataset(image_list, create_cgd_transform(data_config, False, data_config['img_size']))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    forward = getattr(backbone, 'forward_features', backbone)  # a timm model, or a trunk of split_backbone
    chunks = []
    for images, _ in tqdm(loader, desc='feature maps', unit='batch', disable=not progress, leave=False):
        chunks.append(forward(images.to(device)).to('cpu', torch.float16))
    features = torch.cat(chunks)
    labels = torch.tensor(image_list.labels, dtype=torch.long)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({'features': features.contiguous(), 'labels': labels}, str(tmp),
                  metadata={'description': json.dumps(description, sort_keys=True, default=str)})
    return features, labels


def describe_cache(path: PathLike) -> Dict[str, Any]:
    """The description stored with a cache file (for inspection)."""
    with safe_open(str(path), framework='pt') as f:
        return json.loads(f.metadata()['description'])
