"""Retrieval metrics of a model on a list of images: what model selection and the off-the-shelf reference measure."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ..data import ImageDataset, ImageList, create_cgd_transform
from ..retrieval.extract import extract_embeddings
from ..retrieval.metrics import evaluate_retrieval

__all__ = ['validate']


#: The Recall@K cut-offs of held-out validation.
VALIDATION_KS = (1, 2, 4, 8)


def validate(model: nn.Module, image_list: ImageList, data_config: Dict[str, Any], device: torch.device,
             batch_size: int = 128, num_workers: int = 0, amp: Optional[torch.dtype] = None,
             progress: bool = False) -> Dict[str, float]:
    """Recall@1/2/4/8, precision@1 and MAP@R of ``model`` on ``image_list`` (every image a query vs the rest).

    Recall@K needs K <= N - 1 (the other images): on fewer than 9 images the larger K are left out.
    """
    dataset = ImageDataset(image_list, create_cgd_transform(data_config, False, data_config['img_size']))
    embeddings, labels = extract_embeddings(model, dataset, batch_size=batch_size, device=device,
                                            num_workers=num_workers, amp_dtype=amp, progress=progress)
    return evaluate_retrieval(embeddings, labels, ks=[k for k in VALIDATION_KS if k < len(image_list)])
