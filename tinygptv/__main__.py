"""``python -m tinygptv`` is the ``tinygptv`` command."""

import sys

from .cli import main

sys.exit(main())
