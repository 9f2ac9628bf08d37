"""``python -m slhf``: the ``slhf`` command (``slhf.cli``)."""

import sys

from slhf.cli import main

sys.exit(main())
