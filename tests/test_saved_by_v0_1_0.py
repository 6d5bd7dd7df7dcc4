"""What users wrote with cgd_heads 0.1.0 before the package was split into sub-packages still loads: a checkpoint
folder, an interrupted training run (``resume``, checked against 0.1.0's own uninterrupted run) and a saved index
(tests/fixtures/v0_1_0, made by its make_fixtures.py and make_uninterrupted.py at commit 18d34ba)."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cgd_heads import CGDModel, RetrievalIndex, TrainConfig, train
from cgd_heads.data import read_image_folder
from conftest import write_shapes_folder

FIXTURES = Path(__file__).resolve().parent / 'fixtures' / 'v0_1_0'
#: The settings the fixture run was started with (train_config.json holds them).
RUN_CONFIG = dict(model_name='test_efficientnet', embed_dim=32, img_size=24, batch_size=8, m_per_class=2, epochs=2,
                  val_classes=0, num_workers=0, progress=False, sched='cosine', device='cpu')


def test_checkpoint_folder_gives_the_same_embeddings():
    model = CGDModel.from_pretrained(FIXTURES / 'checkpoint').eval()
    expected = load_file(str(FIXTURES / 'expected_embeddings.safetensors'))
    with torch.no_grad():
        torch.testing.assert_close(model(expected['images']), expected['embeddings'], rtol=0, atol=1e-6)
    assert model.config == {'descriptors': 'SG', 'embed_dim': 32, 'model_name': 'test_efficientnet',
                            'num_classes': 4, 'stride_mode': 'strip'}


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    # the reference is 0.1.0's own uninterrupted run (make_uninterrupted.py): a resumed run keeps the schedule it
    # was started with (0.1.0 stepped it per epoch; new runs step it per update), so it must match 0.1.0, not now
    images = read_image_folder(write_shapes_folder(tmp_path / 'shapes', num_classes=4, per_class=4))['all']
    shutil.copytree(FIXTURES / 'run', tmp_path / 'resumed')
    resumed = train(TrainConfig(**RUN_CONFIG), images, tmp_path / 'resumed', resume=True)
    expected_rows = json.loads((FIXTURES / 'uninterrupted.json').read_text())
    assert [row['epoch'] for row in resumed.history] == [1, 2]
    # epoch 1 was computed by 0.1.0, epoch 2 by this version from 0.1.0's optimizer and schedule state
    # The learning rates must match exactly (the schedule); losses and weights to float32 rounding, because the
    # fixture was computed on another CPU, whose kernels may round differently (bit-exact on the machine that made it)
    for row, expected in zip(resumed.history, expected_rows):
        assert {k: row[k] for k in expected if k.startswith('lr') or k == 'epoch'} == \
            {k: v for k, v in expected.items() if k.startswith('lr') or k == 'epoch'}
        assert {k: row[k] for k in expected} == pytest.approx(expected, rel=1e-5)
    expected_weights = load_file(str(FIXTURES / 'uninterrupted.safetensors'))
    state = resumed.model.state_dict()
    assert sorted(state) == sorted(expected_weights)
    # Adam moves a weight by about lr per update whatever the gradient's size, so where a gradient is near zero (the
    # BatchNorm biases, initialised at 0) another CPU's rounding can flip its sign and move that weight the other way:
    # at most 2 updates x lr 5e-5 = 1e-4 in epoch 2 (6.9e-5 measured on a Xeon the fixture was not made on). A
    # restart from scratch or a wrong state would differ by far more; the schedule is checked exactly above.
    for name, value in expected_weights.items():
        torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-4, msg=name)


def test_saved_index_loads_and_searches():
    index = RetrievalIndex.load(FIXTURES / 'index')
    vectors = F.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    assert (len(index), index.dim, index.index_type) == (6, 8, 'flat')
    assert index.labels == [0, 0, 1, 1, 2, None] and index.paths == [f'img{i}.jpg' for i in range(6)]
    assert index.metadata['model']['model_name'] == 'test_efficientnet'
    scores, ids = index.search(vectors, k=6)
    expected = vectors @ vectors.T
    assert ids[:, 0].tolist() == list(range(6))
    torch.testing.assert_close(torch.from_numpy(scores), expected.sort(dim=1, descending=True).values, atol=1e-5,
                               rtol=0)
