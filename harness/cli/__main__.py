"""``python -m harness.cli``: the ``teelab`` command."""

import sys

from harness.cli import main

sys.exit(main())
