"""The shared argument checks, atomic writes' permissions and the option parsers of counts and sizes."""
import argparse
import os
import stat

import numpy as np
import pytest

from cgd_heads.utils.atomic import atomic_dir, atomic_path
from cgd_heads.utils.checks import check_float
from cgd_heads.utils.settings import count_or_fraction, positive_int


@pytest.mark.parametrize('value, kwargs, expected', [
    (3, {}, 3.0), (np.float32(0.5), dict(minimum=0, maximum=1), 0.5), (0.0, dict(minimum=0), 0.0),
    (None, dict(allow_none=True), None), (0.999, dict(minimum=0, maximum=1, below=True), 0.999),
])
def test_check_float_accepts(value, kwargs, expected):
    assert check_float(value, 'x', **kwargs) == expected


@pytest.mark.parametrize('value, kwargs, error, message', [
    ('1e-3', {}, TypeError, "x must be a finite float, got str '1e-3'"),
    (True, {}, TypeError, 'got bool'), (None, {}, TypeError, 'got NoneType'),
    (float('nan'), {}, ValueError, 'finite'), (float('inf'), dict(minimum=0), ValueError, 'finite float >= 0'),
    (0.0, dict(minimum=0, above=True), ValueError, r'x must be a finite float > 0, got 0.0'),
    (1.0, dict(minimum=0, maximum=1, below=True), ValueError, r'>= 0 and < 1, got 1.0'),
    (-1e-9, dict(minimum=0), ValueError, '>= 0'),
])
def test_check_float_refuses_naming_the_argument_and_the_range(value, kwargs, error, message):
    with pytest.raises(error, match=message):
        check_float(value, 'x', **kwargs)


@pytest.mark.parametrize('text, expected', [('20', 20), ('20.0', 20), ('0.2', 0.2), ('0', 0.0), ('1', 1)])
def test_count_or_fraction(text, expected):
    value = count_or_fraction(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize('text', ['1.5', '-0.1', 'nan', 'inf', 'ten'])
def test_count_or_fraction_refuses_what_it_would_have_truncated(text):
    with pytest.raises(argparse.ArgumentTypeError, match='fraction in \\[0, 1\\)'):
        count_or_fraction(text)


def test_positive_int():
    assert positive_int('224') == 224
    for text in ('0', '-3', '2.5', 'x'):
        with pytest.raises(argparse.ArgumentTypeError, match='positive int'):
            positive_int(text)


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path):
    old = os.umask(0o027)
    try:
        with open(tmp_path / 'plain', 'w') as f:
            f.write('x')
        (tmp_path / 'plain_dir').mkdir()
        with atomic_path(tmp_path / 'atomic') as tmp:
            tmp.write_text('x')
        with atomic_dir(tmp_path / 'atomic_dir') as tmp:
            (tmp / 'f').write_text('x')
        assert os.umask(0o027) == 0o027  # reading the umask put it back as it was
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / 'atomic') == mode(tmp_path / 'plain') == 0o640
    assert mode(tmp_path / 'atomic_dir') == mode(tmp_path / 'plain_dir') == 0o750


def test_check_bool_refuses_truthy_values_that_are_not_bools():
    from cgd_heads.utils.checks import check_bool
    assert check_bool(True, 'flag') is True and check_bool(np.bool_(False), 'flag') is False
    for value in ('no', 1, None):
        with pytest.raises(TypeError, match='flag must be True or False'):
            check_bool(value, 'flag')
