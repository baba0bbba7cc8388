"""``python -m pyrovae.cli``."""

import sys

from pyrovae.cli.main import main

sys.exit(main())
