"""Train with the library's ``TrainConfig`` + ``train``, then evaluate zero-shot retrieval on held-out classes.

The image folder is split by class (``load_splits('folder', root, train_classes=...)``): ``train`` fits a CGD model
on the training classes (holding ``--val-classes`` of them out to select the best epoch) and writes checkpoints to
``--out``; ``extract_embeddings`` embeds the unseen test classes and ``evaluate_retrieval`` scores every test image
as a query against the others: Recall@1/2/4/8 and MAP@R are printed.

Run (seconds on a CPU with the tiny defaults; a synthetic data set is written when --data is omitted):

    python examples/02_train_and_evaluate.py
    python examples/02_train_and_evaluate.py --data path/to/images --train-classes 0.5 --model resnet50 \
        --img-size 224 --embed-dim 1536 --batch-size 64 --epochs 20 --iters-per-epoch 0
"""
import argparse

import cgd_heads
from cgd_heads.data import ImageDataset, create_cgd_transform, data_config_of, load_splits
from cgd_heads.utils.settings import count_or_fraction

from _synthetic import add_data_arguments, data_folder, output_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument('--train-classes', type=count_or_fraction, default=0.6,
                        help='classes used for training: a fraction < 1 or a count; the others are the test set')
    parser.add_argument('--val-classes', type=count_or_fraction, default=2,
                        help='training classes held out to select the best epoch: a fraction < 1 or a count')
    parser.add_argument('--model', default='test_resnet', help='timm backbone name')
    parser.add_argument('--img-size', type=int, default=48, help='image size')
    parser.add_argument('--embed-dim', type=int, default=64, help='size of the combined embedding')
    parser.add_argument('--batch-size', type=int, default=16, help='images per batch')
    parser.add_argument('--m-per-class', type=int, default=4, help='images per class in a batch')
    parser.add_argument('--epochs', type=int, default=2, help='training epochs')
    parser.add_argument('--iters-per-epoch', type=int, default=3, help='batches per epoch (0: one pass)')
    parser.add_argument('--lr', type=float, default=1e-3, help='learning rate')
    parser.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:N')
    args = parser.parse_args()
    out = output_folder(args.out, 'train_and_evaluate')

    with data_folder(args.data, args.synthetic_classes, args.synthetic_per_class) as root:
        splits = load_splits('folder', root, train_classes=args.train_classes)
        print(f'train: {len(splits["train"])} images of {splits["train"].num_classes} classes, '
              f'test: {len(splits["test"])} images of {splits["test"].num_classes} unseen classes')

        config = cgd_heads.TrainConfig(
            model_name=args.model, img_size=args.img_size, embed_dim=args.embed_dim, batch_size=args.batch_size,
            m_per_class=args.m_per_class, epochs=args.epochs, iters_per_epoch=args.iters_per_epoch or None,
            lr=args.lr, val_classes=args.val_classes, device=args.device, num_workers=0, progress=False)
        result = cgd_heads.train(config, splits['train'], out / 'run')
        for row in result.history:
            print(f'epoch {row["epoch"]}: loss {row["loss_total"]:.4f}, '
                  f'val Recall@1 {row.get("val_recall@1", float("nan")):.4f}')
        print(f'best checkpoint: {result.best_dir}')

        # zero-shot retrieval on the test classes, with the evaluation transform of the trained model
        transform = create_cgd_transform(data_config_of(result.model, args.img_size), is_training=False,
                                         img_size=args.img_size)
        embeddings, labels = cgd_heads.extract_embeddings(
            result.model, ImageDataset(splits['test'], transform), batch_size=64, device=args.device, progress=False)
    ks = tuple(k for k in (1, 2, 4, 8) if k < len(labels))
    metrics = cgd_heads.evaluate_retrieval(embeddings, labels, ks=ks)
    print(f'test retrieval ({metrics["num_queries"]} queries, {embeddings.shape[1]}-d embeddings):')
    for k in ks:
        print(f'Recall@{k}: {metrics[f"recall@{k}"]:.4f}')
    print(f'MAP@R: {metrics["map@r"]:.4f}')


if __name__ == '__main__':
    main()
