"""The benchmarks. Whatever `theychat` is installed, they measure this checkout's code:
it is made first on the import path of the benchmark and of every daemon it starts
before any benchmark module imports `theychat` (tests/checkout.py)."""

from tests.checkout import use_this_checkout

use_this_checkout()
