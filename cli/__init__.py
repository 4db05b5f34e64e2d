"""The ``ttfsc`` command line: the top floor, importing every layer below and imported by none."""
from ttfsc.cli.main import main

__all__ = ["main"]
