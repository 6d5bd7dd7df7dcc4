"""benchmarks/scale.py runs end to end in its --quick configuration (into a temporary --output), on the index
types that take the two build paths (flat shards; IVF-PQ streamed into on-disk lists) and, when real images are
there, the extraction under torchrun with 1 and 2 processes."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.slow


def test_scale_quick(tmp_path):
    output = tmp_path / 'scale.md'
    proc = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'scale.py'), '--quick', '--indexes',
                           'flat,ivfpq-disk', '--output', str(output), '--work', str(tmp_path / 'work')],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = output.read_text()
    assert 'SMOKE RUN' in text and '## Indexes built from units' in text and '| flat |' in text
    payload = json.loads(output.with_suffix('.json').read_text())
    flat, disk = payload['indexes']['flat'], payload['indexes']['ivfpq-disk']
    assert flat['recall@10'] == 1.0 and flat['count'] == disk['count'] == 2000  # flat shards are exact
    assert 0 < disk['recall@10'] <= 1 and disk['index_bytes'] < flat['index_bytes'] / 5  # PQ codes, not floats
    assert flat['recall@1'] == 1.0 and 0 <= disk['recall@1'] <= 1
    # the quick index has 16 lists: nprobe 4 is measured, 64 and 256 (> 16) are not
    assert disk['settings']['nlist'] == 16 and [s['nprobe'] for s in disk['sweep']] == [4]
    assert 0 < disk['sweep'][0]['qps'] and 0 <= disk['sweep'][0]['recall@10'] <= 1
    assert '| ivfpq-disk | nprobe=4 |' in text
    if (SHARED_DATA / 'caltech101').is_dir() or (SHARED_DATA / 'omniglot').is_dir():
        rows = payload['extraction']
        assert [(r['processes'], r['threads']) for r in rows] == [(1, 2), (2, 1)]
        assert all(r['images'] == 24 and r['images_per_s'] > 0 for r in rows)
    assert not (REPO / 'benchmarks' / 'results' / 'scale.md').exists() or 'SMOKE' not in \
        (REPO / 'benchmarks' / 'results' / 'scale.md').read_text()
