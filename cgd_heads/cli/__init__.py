"""The command-line tools, thin shells over the library: ``cgd-train``, ``cgd-eval``, ``cgd-index``,
``cgd-search``, ``cgd-export`` and ``cgd-demo``, one module each. Every command reports bad input as one line
``<command>: error: ...`` on stderr and exits with status 2 (``CGD_HEADS_DEBUG=1`` shows the traceback)."""
from .common import run_cli
from .demo import main as demo_main
from .evaluate import main as eval_main
from .export import main as export_main
from .index import main as index_main
from .search import main as search_main
from .train import main as train_main

__all__ = ['demo_main', 'eval_main', 'export_main', 'index_main', 'run_cli', 'search_main', 'train_main']
