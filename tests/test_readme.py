"""Run every ```python block of the README, in order, so the documentation cannot rot."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / 'README.md'
BLOCKS = re.findall(r'```python\n(.*?)```', README.read_text(encoding='utf-8'), flags=re.S)


def test_readme_has_code_blocks():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize('index', range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    exec(compile(BLOCKS[index], f'README.md block {index}', 'exec'), {'__name__': '__readme__'})
