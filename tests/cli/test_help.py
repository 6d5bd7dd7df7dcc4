"""Every option of every command documents itself: ``--help`` prints a default only for options with help text
(argparse's ArgumentDefaultsHelpFormatter appends it to the help string), and docs/cli.md promises the defaults."""
import argparse

import pytest

from cgd_heads.cli import demo, evaluate, export, index, search, train

PARSERS = {'cgd-demo': demo._parser, 'cgd-train': train.build_parser, 'cgd-eval': evaluate.build_parser,
           'cgd-index': index.build_parser, 'cgd-search': search.build_parser, 'cgd-export': export.build_parser}


@pytest.mark.parametrize('command', sorted(PARSERS))
def test_every_option_has_help_and_shows_its_default(command):
    parser = PARSERS[command]()
    assert parser.formatter_class is argparse.ArgumentDefaultsHelpFormatter
    undocumented = [a.option_strings or [a.dest] for a in parser._actions
                    if not isinstance(a, argparse._HelpAction) and not a.help]
    assert undocumented == [], f'{command}: options without help text: {undocumented}'
    text = parser.format_help()
    for action in parser._actions:  # every default worth printing is printed
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and action.help:
            assert f'(default: {action.default})' in ' '.join(text.split()), (command, action.option_strings)
