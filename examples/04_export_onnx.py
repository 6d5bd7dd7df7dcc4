"""Export a CGD model to ONNX with ``cgd_heads.export_onnx`` and check onnxruntime against PyTorch.

The model is a checkpoint folder (``--checkpoint``, e.g. ``run/best`` written by ``train`` / ``cgd-train``) or,
without one, a freshly initialised ``cgd_heads.create_model(--model)``. ``export_onnx`` writes an ``images (N, 3, H,
W) -> embeddings (N, D)`` graph with a dynamic batch size to ``--out/model.onnx`` (and verifies it on random
images). The script then runs the file itself with onnxruntime on real images of the folder, preprocessed with the
CGD evaluation transform, and prints the largest absolute difference to PyTorch's embeddings (float32: ~1e-7).

Needs ``onnx``, ``onnxscript`` and ``onnxruntime`` (``pip install -e .[dev]``).

Run (seconds on a CPU with the tiny defaults; a synthetic data set is written when --data is omitted):

    python examples/04_export_onnx.py
    python examples/04_export_onnx.py --data path/to/images --checkpoint runs/cars/best
"""
import argparse

import numpy as np
import onnxruntime
import torch

import cgd_heads
from cgd_heads.data import ImageDataset, create_cgd_transform, data_config_of, load_splits

from _synthetic import add_data_arguments, data_folder, output_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument('--checkpoint', default=None, help='checkpoint folder (default: a new --model)')
    parser.add_argument('--model', default='test_efficientnet', help='timm backbone name, without --checkpoint')
    parser.add_argument('--embed-dim', type=int, default=64, help='embedding size, without --checkpoint')
    parser.add_argument('--img-size', type=int, default=48, help='image size, without --checkpoint')
    parser.add_argument('--num-images', type=int, default=8, help='images compared between onnxruntime and PyTorch')
    args = parser.parse_args()
    out = output_folder(args.out, 'export_onnx')

    torch.manual_seed(0)
    if args.checkpoint:
        model, saved = cgd_heads.load_pretrained(args.checkpoint, return_config=True)
        data = saved['data']
    else:
        model = cgd_heads.create_model(args.model, descriptors='SG', embed_dim=args.embed_dim)
        data = data_config_of(model, args.img_size)
    model.eval()
    size = (3, data['img_size'], data['img_size'])
    path = cgd_heads.export_onnx(model, out / 'model.onnx', input_size=size)
    print(f'exported {path} ({path.stat().st_size / 1e6:.2f} MB), input {size}')

    with data_folder(args.data, args.synthetic_classes, args.synthetic_per_class) as root:
        dataset = ImageDataset(load_splits('folder', root)['all'],
                               create_cgd_transform(data, is_training=False, img_size=data['img_size']))
        batch = torch.stack([dataset[i][0] for i in range(min(args.num_images, len(dataset)))])

    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    exported = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    with torch.no_grad():
        reference = model(batch).numpy()
    print(f'onnxruntime: {exported.shape} embeddings of {len(batch)} images, PyTorch: {reference.shape}')
    print(f'max abs difference: {np.abs(exported - reference).max():.3e}')


if __name__ == '__main__':
    main()
