"""Training loop: learning happens, checkpoints are complete, a resumed run equals an uninterrupted one."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import cgd_heads.training.trainer as train_module
from cgd_heads.training.optim import describe_schedule, make_optimizer, make_scheduler
from cgd_heads.models import load_config, load_pretrained, load_training_state
from cgd_heads.data import load_splits
from cgd_heads.training import TrainConfig, train

TINY = dict(model_name='test_resnet', embed_dim=16, img_size=24, resize_size=28, batch_size=8, m_per_class=2,
            epochs=2, lr=1e-3, num_workers=0, progress=False, val_classes=2, eval_batch_size=16, seed=3)


def test_train_writes_checkpoints_and_metrics(shapes_folder, tmp_path):
    splits = load_splits('folder', shapes_folder)
    result = train(TrainConfig(**TINY), splits['all'], tmp_path / 'run')
    rows = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [1, 2]
    assert all('val_recall@1' in r and r['loss_total'] > 0 for r in rows)
    config = load_config(tmp_path / 'run' / 'best')
    assert config['model']['model_name'] == 'test_resnet' and config['data']['img_size'] == 24
    assert len(config['class_names']) == 6  # 8 classes, 2 held out for validation
    assert config['model']['num_classes'] == 6
    recalls = [r['val_recall@1'] for r in rows]
    best_epoch = recalls.index(max(recalls)) + 1  # the first epoch with the highest held-out R@1 (ties keep it)
    assert config['epoch'] == best_epoch and result.best_metric == max(recalls)
    # best/ holds that epoch's weights: the last epoch's (last/) exactly when the last epoch won
    best = load_pretrained(tmp_path / 'run' / 'best').state_dict()
    last = load_pretrained(tmp_path / 'run' / 'last').state_dict()
    assert all(torch.equal(best[k], last[k]) for k in best) == (best_epoch == len(rows))


def test_existing_run_is_never_overwritten(shapes_folder, tmp_path):
    splits = load_splits('folder', shapes_folder)
    train(TrainConfig(**dict(TINY, epochs=1)), splits['all'], tmp_path / 'run')
    with pytest.raises(ValueError, match='already holds a training run'):
        train(TrainConfig(**dict(TINY, epochs=1)), splits['all'], tmp_path / 'run')
    with pytest.raises(ValueError, match='nothing to resume'):
        train(TrainConfig(**TINY), splits['all'], tmp_path / 'other', resume=True)


def test_resume_reproduces_the_uninterrupted_run(shapes_folder, tmp_path, monkeypatch):
    splits = load_splits('folder', shapes_folder)
    config = TrainConfig(**dict(TINY, epochs=3, sched='step'))
    full = train(config, splits['all'], tmp_path / 'full')

    real_append = train_module._append_jsonl

    def crash_after_first_epoch(path, rows):
        real_append(path, rows)
        if len(rows) == 1:
            raise KeyboardInterrupt  # the process dies after epoch 1 was checkpointed

    monkeypatch.setattr(train_module, '_append_jsonl', crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(config, splits['all'], tmp_path / 'resumed')
    monkeypatch.setattr(train_module, '_append_jsonl', real_append)
    assert load_training_state(tmp_path / 'resumed' / 'last')['epoch'] == 0
    resumed = train(config, splits['all'], tmp_path / 'resumed', resume=True)

    a = load_file(str(tmp_path / 'full' / 'last' / 'model.safetensors'))
    b = load_file(str(tmp_path / 'resumed' / 'last' / 'model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k not in ('seconds', 'images_per_s')} for r in resumed.history]
    assert strip == [{k: v for k, v in r.items() if k not in ('seconds', 'images_per_s')} for r in full.history]


def test_resume_refuses_changed_settings(shapes_folder, tmp_path):
    splits = load_splits('folder', shapes_folder)
    train(TrainConfig(**dict(TINY, epochs=1)), splits['all'], tmp_path / 'run')
    with pytest.raises(ValueError, match='embed_dim: 32 != 16'):
        train(TrainConfig(**dict(TINY, embed_dim=32)), splits['all'], tmp_path / 'run', resume=True)
    # other training classes under the same settings: the saved class names tell (the settings do not name data)
    from cgd_heads.data import ImageList
    images = splits['all']
    renamed = ImageList(images.paths, images.labels, [f'other_{n}' for n in images.class_names])
    with pytest.raises(ValueError, match='its training classes differ from the saved run'):
        train(TrainConfig(**dict(TINY, epochs=1)), renamed, tmp_path / 'run', resume=True)
    assert len(train(TrainConfig(**dict(TINY, epochs=1)), images, tmp_path / 'run', resume=True).history) == 1


def test_training_improves_retrieval_on_held_out_classes(tmp_path):
    from conftest import write_shapes_folder
    splits = load_splits('folder', write_shapes_folder(tmp_path / 'shapes', num_classes=12, per_class=8),
                         train_classes=8)
    config = TrainConfig(**dict(TINY, epochs=6, val_classes=0, lr=3e-3))
    from cgd_heads.data import data_config_of
    from cgd_heads.training import build_model, validate
    from cgd_heads.utils.runtime import seed_everything
    seed_everything(config.seed)
    untrained = build_model(config, 8)
    data_config = data_config_of(untrained, config.img_size)
    before = validate(untrained, splits['test'], data_config, torch.device('cpu'))
    result = train(config, splits['train'], tmp_path / 'run')
    after = validate(result.model, splits['test'], data_config, torch.device('cpu'))
    assert after['map@r'] > before['map@r'] + 0.1, (before, after)


@pytest.mark.parametrize('optimizer', ['adam', 'sgd'])
def test_head_lr_applies_to_the_head_only_and_follows_the_schedule(optimizer):
    config = TrainConfig(model_name='test_resnet', embed_dim=16, epochs=4, lr=1e-4, head_lr=1e-2, sched='cosine',
                         optimizer=optimizer)
    model = train_module.build_model(config, num_classes=5)
    opt = make_optimizer(model, config)
    backbone, head = opt.param_groups
    # every trainable parameter in exactly one group, the head's (classifier included) in the second
    assert {id(p) for p in head['params']} == {id(p) for p in model.head.parameters()}
    assert {id(p) for p in backbone['params']} == {id(p) for p in model.backbone.parameters()}
    assert len(backbone['params']) + len(head['params']) == len(list(model.parameters()))
    assert (backbone['lr'], head['lr']) == (1e-4, 1e-2)
    scheduler = make_scheduler(opt, config, iters_per_epoch=3)
    scheduler.step_update(6)  # half way through 12 updates of a cosine schedule: both at half their base rate
    assert backbone['lr'] == pytest.approx(0.5e-4) and head['lr'] == pytest.approx(0.5e-2)
    # the default: one group at one rate, the layout of optimizer states saved before head_lr existed
    same = make_optimizer(model, TrainConfig(model_name='test_resnet', lr=3e-4))
    assert [(len(g['params']), g['lr']) for g in same.param_groups] == [(len(list(model.parameters())), 3e-4)]


@pytest.mark.parametrize('kwargs, match', [
    (dict(batch_size=10, m_per_class=4), 'multiple of m_per_class'),
    (dict(optimizer='lion'), 'optimizer'), (dict(sched='linear'), 'sched'), (dict(lr=0.0), 'lr'),
    (dict(head_lr=-1e-3), 'head_lr'), (dict(head_lr=float('nan')), 'head_lr'),
    (dict(epochs=0), 'epochs'), (dict(select_metric='recall@2'), 'select_metric'),
    # no positive pair (m = 1) or no negative class (one class per batch): the ranking loss would be 0 throughout
    (dict(m_per_class=1, batch_size=8), 'm_per_class=1: the ranking loss needs at least 2 images per class'),
    (dict(m_per_class=4, batch_size=4), 'at least 2 classes per batch'),
    (dict(weight_decay=float('nan')), 'weight_decay'), (dict(momentum=-5.0), 'momentum'),
    (dict(momentum=1.0), 'momentum'), (dict(val_classes=float('nan')), 'val_classes'),
    (dict(gem_p=0.0), 'gem_p'), (dict(gem_p=200.0, learnable_p=True), 'learnable gem_p must start in'),
    (dict(margin=-1.0), 'margin'), (dict(temperature=0.0), 'temperature'), (dict(label_smoothing=1.0), 'smoothing'),
    (dict(descriptors='XY'), 'unknown letters'), (dict(descriptors='SMG', embed_dim=16), 'divisible by the 3'),
    (dict(warmup_epochs=2, epochs=2), 'warmup_epochs=2 must be less than epochs=2'),
    (dict(clip_grad=0.0), 'clip_grad'), (dict(seed=-1), 'seed'),
    # refused when the config is made, not after the run folder and the model exist
    (dict(stride_mode='bogus'), 'stride_mode must be one of'), (dict(amp='fp8'), 'amp must be one of'),
    (dict(img_size=224, resize_size=200), r'resize_size must be >= img_size \(224\)'),
    (dict(device='gpu0'), 'device must be "auto", "cpu", "cuda" or "cuda:N"'),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.parametrize('kwargs, match', [(dict(lr='1e-3'), 'lr must be a finite float > 0, got str'),
                                           (dict(head_lr='1e-3'), 'head_lr'), (dict(num_workers=1.5), 'num_workers')])
def test_config_of_the_wrong_type(kwargs, match):
    with pytest.raises(TypeError, match=match):
        TrainConfig(**kwargs)


def test_one_image_per_class_is_fine_without_the_ranking_loss():
    assert TrainConfig(m_per_class=1, batch_size=8, ranking_weight=0.0).m_per_class == 1


def test_weight_decay_spares_the_parameters_the_model_names():
    # GeM's learnable p must not decay: pulled below 1 it would sit in the clamp with no gradient, stuck at SPoC
    config = TrainConfig(model_name='test_resnet', embed_dim=16, descriptors='SG', learnable_p=True,
                         weight_decay=1e-2, head_lr=1e-2)
    model = train_module.build_model(config, num_classes=5)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [(g['lr'], g['weight_decay'], {names[id(p)] for p in g['params']})
              for g in make_optimizer(model, config).param_groups]
    spared = {n for n in model.no_weight_decay()}
    assert spared == {'head.pools.1.p'}  # the G branch (S is a fixed p = 1)
    head = {n for n, _ in model.head.named_parameters(prefix='head')}
    assert groups == [(1e-4, 1e-2, set(names.values()) - head), (1e-2, 1e-2, head - spared), (1e-2, 0.0, spared)]
    # without decay the layout is one group per rate (the layout of states saved before the split)
    plain = make_optimizer(model, TrainConfig(model_name='test_resnet', learnable_p=True, head_lr=1e-2))
    assert [g['weight_decay'] for g in plain.param_groups] == [0.0, 0.0]


def test_sampler_requirements_are_checked_before_training(shapes_folder, tmp_path):
    splits = load_splits('folder', shapes_folder)
    with pytest.raises(ValueError, match='needs 16 per batch'):
        train(TrainConfig(**dict(TINY, batch_size=32, m_per_class=2)), splits['all'], tmp_path / 'a')
    # the held-out classes are what leave too few: the message names both fixes and the largest batch that fits
    num_classes = len(set(splits['all'].labels))
    with pytest.raises(ValueError, match=rf'has {num_classes - 1} classes \(after holding out val_classes=1\).*'
                                         rf'lower batch_size \(at most {2 * (num_classes - 1)}\) or hold out fewer'):
        train(TrainConfig(**dict(TINY, batch_size=2 * num_classes, m_per_class=2, val_classes=1)), splits['all'],
              tmp_path / 'c')
    with pytest.raises(ValueError, match='fewer than m_per_class=8 images'):
        train(TrainConfig(**dict(TINY, batch_size=16, m_per_class=8, val_classes=0)), splits['all'], tmp_path / 'b')


def _lrs_per_update(config, iters):
    """The learning rate each optimizer update runs at, driven the way the trainer drives the scheduler."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = make_scheduler(opt, config, iters)
    used = []
    for update in range(1, config.epochs * iters + 1):
        used.append(opt.param_groups[0]['lr'])
        scheduler.step_update(update)
    return used


@pytest.mark.parametrize('epochs, iters', [(2, 30), (3, 7), (20, 1), (1, 5)])
def test_step_schedule_drops_inside_epochs(epochs, iters):
    # the reference: update u (1-based) of T runs at lr * 0.1 ** #{f in (0.6, 0.8): u > round(f * T)}
    config = TrainConfig(model_name='test_resnet', epochs=epochs, lr=1e-2, sched='step')
    total = epochs * iters
    expected = [1e-2 * 0.1 ** sum(u > max(1, round(f * total)) for f in (0.6, 0.8)) for u in range(1, total + 1)]
    assert _lrs_per_update(config, iters) == pytest.approx(expected)
    if (epochs, iters) == (2, 30):  # the short run of the issue: 36 updates at lr, 12 at lr/10, 12 at lr/100
        assert [expected.count(v) for v in (1e-2, 1e-3)] == [36, 12]
        assert 'x0.1 after update 36 (epoch 1.20), update 48 (epoch 1.60)' in describe_schedule(config, iters)


def test_cosine_and_warmup_per_update():
    config = TrainConfig(model_name='test_resnet', epochs=4, lr=1e-2, sched='cosine', warmup_epochs=1)
    used = _lrs_per_update(config, iters=5)
    # warm-up: linear from lr / 100 over the first 5 updates, then the cosine over all 20 updates
    assert used[:5] == pytest.approx([1e-4 + u * (1e-2 - 1e-4) / 5 for u in range(5)])
    assert used[5:] == pytest.approx([0.5e-2 * (1 + math.cos(math.pi * t / 20)) for t in range(5, 20)])
    assert 'warm-up' in describe_schedule(config, 5) and 'cosine' in describe_schedule(config, 5)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    assert make_scheduler(opt, TrainConfig(model_name='test_resnet', sched='none'), 3) is None


@pytest.mark.parametrize('sched', ['step', 'none'])
def test_warmup_then_the_schedule_as_described(sched):
    # the reference: updates 1..W rise linearly from lr/100 (update u at lr/100 + (u-1)(lr - lr/100)/W), then the
    # step drops after round(0.6 T) and round(0.8 T) counted from update 1, warm-up included ('none': constant)
    config = TrainConfig(model_name='test_resnet', epochs=5, lr=1e-2, sched=sched, warmup_epochs=1)
    iters, total = 4, 20
    drops = (12, 16) if sched == 'step' else ()
    expected = [1e-4 + (u - 1) * (1e-2 - 1e-4) / iters if u <= iters else 1e-2 * 0.1 ** sum(u > m for m in drops)
                for u in range(1, total + 1)]
    assert _lrs_per_update(config, iters) == pytest.approx(expected)
    text = describe_schedule(config, iters)
    assert 'linear warm-up from lr/100 over 4 updates' in text
    assert ('x0.1 after update 12 (epoch 3.00), update 16 (epoch 4.00)' in text) == (sched == 'step')


@pytest.mark.parametrize('option', [
    'channels_last', pytest.param('compile', marks=[pytest.mark.slow, pytest.mark.skipif(
        not __import__('shutil').which('cc'), reason="torch.compile on the CPU needs a C compiler ('cc')")])])
def test_speed_options_compute_the_same_run(shapes_folder, tmp_path, option):
    # a speed option changes how the step runs, not what it computes: the same losses up to rounding (weights are
    # not compared: Adam turns rounding-sized gradient differences of near-zero entries into lr-sized steps)
    splits = load_splits('folder', shapes_folder)
    # test_efficientnet: the stride is stripped in a convolution, as in the Lite0 recipe (inductor mis-strides the
    # backward of the replicate padding that test_resnet's stripped pooling uses: a torch bug, not worked around)
    tiny = dict(TINY, model_name='test_efficientnet')
    plain = train(TrainConfig(**tiny), splits['all'], tmp_path / 'plain')
    fast = train(TrainConfig(**dict(tiny, **{option: True})), splits['all'], tmp_path / option)
    for a, b in zip(plain.history, fast.history):
        assert b['loss_total'] == pytest.approx(a['loss_total'], rel=1e-3, abs=1e-4)
    assert len(fast.history) == len(plain.history) == TINY['epochs']
    # and a run may be resumed with the option switched (it is not one of the settings that define the run)
    assert option in train_module._RESUMABLE_CHANGES


def test_a_small_or_damaged_held_out_split_is_handled_before_training(shapes_folder, tmp_path):
    from cgd_heads.data import ImageList
    splits = load_splits('folder', shapes_folder)
    train_list, val_list = splits['all'].split_classes(2, seed=0)
    # two held-out classes of 3 images: each query ranks 5 others, so Recall@8 cannot exist; R@1/2/4 still do
    keep = [i for c in sorted(set(val_list.labels)) for i in [j for j, y in enumerate(val_list.labels) if y == c][:3]]
    few = ImageList([val_list.paths[i] for i in keep], [val_list.labels[i] for i in keep], val_list.class_names)
    small = train(TrainConfig(**dict(TINY, epochs=1)), train_list, tmp_path / 'small', val_list=few)
    assert {'val_recall@1', 'val_recall@4'} <= set(small.history[0]) and 'val_recall@8' not in small.history[0]
    # one held-out class cannot select: every neighbour is of the query's class, R@1 = MAP@R = 1 at every epoch
    with pytest.raises(ValueError, match='the held-out images are of 1 class; model selection needs at least 2'):
        train(TrainConfig(**dict(TINY, epochs=1, val_classes=1)), splits['all'], tmp_path / 'one')
    assert not (tmp_path / 'one').exists()
    # and a held-out count the classes cannot give names the option
    with pytest.raises(ValueError, match=r'val_classes=8: held_out'):
        train(TrainConfig(**dict(TINY, epochs=1, val_classes=8)), splits['all'], tmp_path / 'all_out')
    # an unreadable held-out image: skip_bad_images leaves it out of validation too (it was read there unchecked)
    bad = tmp_path / 'bad.png'
    bad.write_bytes(b'not an image')
    damaged = ImageList(val_list.paths + [str(bad)], val_list.labels + [val_list.labels[0]], val_list.class_names)
    result = train(TrainConfig(**dict(TINY, epochs=1)), train_list, tmp_path / 'damaged', val_list=damaged,
                   skip_bad_images=True)
    assert result.history[0]['val_num_queries'] == len(val_list)  # the 12 readable images, not 13
    # and a held-out split with no class of two images is refused before a run folder is made
    singles = ImageList(val_list.paths[:1] + val_list.paths[-1:], [0, 1], val_list.class_names[:2])
    with pytest.raises(ValueError, match='no class with 2 images'):
        train(TrainConfig(**dict(TINY, epochs=1)), train_list, tmp_path / 'singles', val_list=singles)
    assert not (tmp_path / 'singles').exists()


def test_the_log_says_what_best_will_hold(shapes_folder, tmp_path, caplog):
    splits = load_splits('folder', shapes_folder)
    with caplog.at_level('INFO', logger='cgd_heads.training.trainer'):
        train(TrainConfig(**dict(TINY, epochs=1)), splits['all'], tmp_path / 'held_out')
        train(TrainConfig(**dict(TINY, epochs=3, eval_every=2)), splits['all'], tmp_path / 'every_2nd')
        train(TrainConfig(**dict(TINY, epochs=2, val_classes=0)), splits['all'], tmp_path / 'all')
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('model selection')]
    # the shapes folder holds 6 images per class: 2 held-out classes are 12 images
    assert lines[0] == ('model selection: best/ keeps the epoch with the highest recall@1 on 2 held-out classes '
                        '(12 images), validated after every epoch')
    assert lines[1].endswith('validated every 2 epochs and after the last')
    rows = [json.loads(line) for line in (tmp_path / 'every_2nd' / 'metrics.jsonl').read_text().splitlines()]
    assert ['val_recall@1' in r for r in rows] == [False, True, True]  # what the message promised
    assert lines[2].startswith("model selection: none (no held-out classes: val_classes=0); best/ holds the last")
    # and it does: with nothing to select with, best/ is the last of the 2 epochs, equal to last/
    assert load_config(tmp_path / 'all' / 'best')['epoch'] == 2
    a = load_file(str(tmp_path / 'all' / 'best' / 'model.safetensors'))
    b = load_file(str(tmp_path / 'all' / 'last' / 'model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_skipped_bad_images_leave_the_schedule_as_run(shapes_folder, tmp_path, monkeypatch):
    # the schedule is laid out from the images the loader serves: with 4 unreadable training images counted,
    # 40 // 8 = 5 updates would be scheduled per epoch while 36 // 8 = 4 run
    from cgd_heads.data import ImageList
    train_list, val_list = load_splits('folder', shapes_folder)['all'].split_classes(2, seed=0)
    bad = []
    for i in range(4):
        (tmp_path / f'bad{i}.png').write_bytes(b'not an image')
        bad.append(str(tmp_path / f'bad{i}.png'))
    damaged = ImageList(train_list.paths + bad, train_list.labels + [0] * 4, train_list.class_names)
    runs, steps = [], []
    real_build, real_step = train_module._build_run, train_module._train_step
    monkeypatch.setattr(train_module, '_build_run', lambda *a: runs.append(real_build(*a)) or runs[-1])
    monkeypatch.setattr(train_module, '_train_step', lambda *a: steps.append(1) or real_step(*a))
    train(TrainConfig(**dict(TINY, epochs=1)), damaged, tmp_path / 'run', val_list=val_list, skip_bad_images=True)
    assert runs[0].iters == len(steps) == len(train_list) // TINY['batch_size'] == 4


def test_yes_no_arguments_and_extra_are_checked_before_any_work(shapes_folder, tmp_path, monkeypatch):
    splits = load_splits('folder', shapes_folder)
    started = []
    monkeypatch.setattr(train_module, '_build_run', lambda *a, **k: started.append(1) or pytest.fail('started'))
    for kwargs, error, match in (({'resume': 'False'}, TypeError, "resume must be True or False, got str"),
                                 ({'skip_bad_images': 'no'}, TypeError, 'skip_bad_images must be True or False'),
                                 ({'extra': {'model': 'mine'}}, ValueError, r"writes itself, got \['model'\]")):
        with pytest.raises(error, match=match):  # 'False' resumed; the clashing key failed after the first epoch
            train(TrainConfig(**dict(TINY, epochs=1)), splits['all'], tmp_path / 'run', **kwargs)
    assert started == [] and not (tmp_path / 'run').exists()
