"""``python -m pipeline.bench``: the bench, or one of its child measurements."""

import sys

from pipeline.bench.cli import main

sys.exit(main())
