"""``python -m deltatune.sweep OPTIONS.json RESULT.json``: one run of a sweep in this process (``cell.main``)."""

import os
import sys

from .cell import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.exit(main(sys.argv[1:]))
