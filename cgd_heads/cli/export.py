"""``cgd-export``: a checkpoint as an ONNX file (image -> embedding), verified with onnxruntime."""
from __future__ import annotations

import argparse
import logging
from typing import List, Optional

from ..models.cgd_model import load_pretrained
from ..models.export import export_onnx
from ..utils.settings import positive_int
from .common import run_cli

__all__ = ['main', 'build_parser']


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='cgd-export', description='Export a checkpoint to ONNX (image -> embedding), '
                                'verified with onnxruntime.', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--checkpoint', required=True, help='checkpoint folder (e.g. RUN/best)')
    p.add_argument('--out', required=True, help='.onnx file to write')
    p.add_argument('--img-size', type=positive_int, default=None, help='default: the size the model was trained at')
    p.add_argument('--opset', type=positive_int, default=18, help='ONNX opset version')
    p.add_argument('--no-verify', action='store_true', help='skip the onnxruntime comparison')
    return p


def run(args: argparse.Namespace) -> None:
    model, config = load_pretrained(args.checkpoint, return_config=True)
    size = args.img_size or config.get('data', {}).get('img_size') or model.pretrained_cfg['input_size'][-1]
    path = export_onnx(model, args.out, input_size=(3, size, size), opset=args.opset, verify=not args.no_verify)
    print(f'exported {args.checkpoint} -> {path} (input: N x 3 x {size} x {size}, output: N x {model.embed_dim})')


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    return run_cli('cgd-export', lambda: run(build_parser().parse_args(argv)))
