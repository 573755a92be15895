"""Only for the optional C accelerator (node/_accel.c); everything else is in setup.cfg.

`optional=True`: where it cannot be built (no C compiler, no Python headers), the install goes on
without it and the node runs the same code in pure Python (node/ledger.py says which)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("node._accel", ["node/_accel.c"], optional=True)])
