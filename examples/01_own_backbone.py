"""Your own timm backbone + CGD head + CGD loss in a plain PyTorch training loop.

Shows the building blocks without the library's trainer: ``timm.create_model`` makes the backbone,
``cgd_heads.strip_last_stride`` removes its last downsampling step (the final feature map doubles, as in the CGD
paper), ``cgd_heads.CGDHead`` turns the feature map into a unit-norm embedding (plus auxiliary logits), and
``cgd_heads.CGDLoss`` is the batch-hard triplet + label-smoothed softmax objective. Batches hold m images of each of
batch_size / m classes (pytorch-metric-learning's ``MPerClassSampler``); images are read with ``cgd_heads.data``
and the CGD train transform. The loss is printed after every step.

Run (seconds on a CPU with the tiny defaults; a synthetic data set is written when --data is omitted):

    python examples/01_own_backbone.py
    python examples/01_own_backbone.py --data path/to/images --model resnet50 --pretrained --img-size 224 \
        --embed-dim 1536 --batch-size 32 --steps 100
"""
import argparse

import timm
import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from torch.utils.data import DataLoader

import cgd_heads
from cgd_heads.data import ImageDataset, create_cgd_transform, load_splits

from _synthetic import add_data_arguments, data_folder, output_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument('--model', default='test_resnet', help='timm backbone name')
    parser.add_argument('--pretrained', action='store_true', help="timm's pretrained weights (needs the hub)")
    parser.add_argument('--img-size', type=int, default=48, help='training image size')
    parser.add_argument('--descriptors', default='SG', help='global descriptors: S (SPoC), M (MAC), G (GeM)')
    parser.add_argument('--embed-dim', type=int, default=64, help='size of the combined embedding')
    parser.add_argument('--batch-size', type=int, default=16, help='images per batch')
    parser.add_argument('--m-per-class', type=int, default=4, help='images per class in a batch')
    parser.add_argument('--steps', type=int, default=5, help='training steps')
    parser.add_argument('--lr', type=float, default=1e-3, help='Adam learning rate')
    args = parser.parse_args()
    torch.manual_seed(0)
    out = output_folder(args.out, 'own_backbone')

    with data_folder(args.data, args.synthetic_classes, args.synthetic_per_class) as root:
        images = load_splits('folder', root)['all']
        print(f'{len(images)} images of {images.num_classes} classes in {root}')

        # 1. the backbone: any timm model, without its classifier and pooling
        backbone = timm.create_model(args.model, pretrained=args.pretrained, num_classes=0, global_pool='')
        size = (3, args.img_size, args.img_size)
        before = cgd_heads.feature_map_size(backbone, size)
        cgd_heads.strip_last_stride(backbone, mode='strip', input_size=size)
        print(f'feature map at {args.img_size} px: {before} -> {cgd_heads.feature_map_size(backbone, size)} '
              f'after strip_last_stride')

        # 2. the head (with an auxiliary classifier over the training classes) and the loss
        head = cgd_heads.CGDHead(backbone.num_features, descriptors=args.descriptors, embed_dim=args.embed_dim,
                                 num_classes=images.num_classes)
        criterion = cgd_heads.CGDLoss(margin=0.1, aux_loss=head.aux_head.loss)

        # 3. the data: CGD train transform with the backbone's normalisation, m-per-class batches
        data_config = timm.data.resolve_model_data_config(backbone)
        dataset = ImageDataset(images, create_cgd_transform(data_config, is_training=True, img_size=args.img_size))
        sampler = MPerClassSampler(dataset.labels, m=args.m_per_class, batch_size=args.batch_size,
                                   length_before_new_iter=args.steps * args.batch_size)
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)

        # 4. a plain training loop
        optimizer = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=args.lr)
        backbone.train(), head.train()
        for step, (batch, labels) in enumerate(loader, start=1):
            embeddings, logits = head.forward_train(backbone.forward_features(batch))
            loss = criterion(embeddings, labels, logits)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            parts = criterion.last_parts
            print(f'step {step}/{args.steps}: loss {loss.item():.4f} (ranking {parts["ranking"].item():.4f}, '
                  f'classification {parts["classification"].item():.4f})')

    torch.save({'backbone': backbone.state_dict(), 'head': head.state_dict()}, out / 'weights.pt')
    print(f'weights: {out / "weights.pt"}')


if __name__ == '__main__':
    main()
