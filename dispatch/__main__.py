"""``python -m dispatch``: the same as the ``dispatch`` command."""

import sys

from dispatch.cli import main

sys.exit(main())
