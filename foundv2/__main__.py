"""``python -m foundv2`` is the ``foundv2`` command."""

import sys

from foundv2.cli import main

sys.exit(main())
