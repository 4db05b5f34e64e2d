"""``python -m ttfsc.cli``: the same as the ``ttfsc`` command."""
import sys

from ttfsc.cli.main import main

sys.exit(main())
