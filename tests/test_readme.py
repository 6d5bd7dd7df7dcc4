"""The README as a front page: every ```python block runs, in order, and prints exactly the ```text block that
follows it after a line saying "prints"; user-facing commands use placeholders, never this workspace's paths."""
import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / 'README.md'
TEXT = README.read_text(encoding='utf-8')
#: (code, expected output or None) for each python block
BLOCKS = [(m.group(1), m.group(3)) for m in re.finditer(
    r'```python\n(.*?)```\n(\nprints\n\n```text\n(.*?)```\n)?', TEXT, flags=re.S)]


def test_readme_is_a_front_page():
    assert len(BLOCKS) >= 3 and sum(expected is not None for _, expected in BLOCKS) >= 3
    assert len(TEXT.splitlines()) <= 200, 'the README is a front page: details go to docs/ and benchmarks/'
    for heading in ('## Install', '## Quickstart', '## Results', '## Citation', '## Licence'):
        assert heading in TEXT
    # the descriptor letters are explained before any code uses them
    assert TEXT.index('S = average') < TEXT.index('```python')
    assert '../shared' not in TEXT and '/work/' not in TEXT


@pytest.mark.parametrize('index', range(len(BLOCKS)))
def test_readme_block_prints_what_it_says(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    code, expected = BLOCKS[index]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f'README.md block {index}', 'exec'), {'__name__': '__readme__'})
    if expected is not None:
        assert out.getvalue() == expected
