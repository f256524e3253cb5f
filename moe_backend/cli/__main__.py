"""``python -m moe_backend.cli``: the ``moe-backend`` command."""

import sys

from . import main

sys.exit(main())
