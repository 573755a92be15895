"""`python -m tools.chaos ...`: the same as `ledger-chaos ...`."""

import sys

from .cli import main

sys.exit(main())
