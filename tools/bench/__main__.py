"""`python -m tools.bench ...`: the same as `ledger-bench ...`, and the helper modes `_echo` and `_watchers`."""

import sys

from .cli import main

sys.exit(main())
