"""``python -m expertflow_compile.cli``: the same entry point as the ``expertflow`` command."""

import sys

from .main import main

sys.exit(main())
