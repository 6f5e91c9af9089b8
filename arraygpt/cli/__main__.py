"""``python -m arraygpt.cli``: the same as the ``arraygpt`` command."""

import sys

from arraygpt.cli import main

sys.exit(main())
