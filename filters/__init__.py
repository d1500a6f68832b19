"""Pure per-sample rules and signal functions (Arrow and NumPy in, NumPy and Arrow out)."""

import os

# Rules run on one batch of rows (a few files) at a time, with the parallelism across files (Ray
# tasks, helper processes). A Polars thread pool per process only adds wake-ups and spinning
# there: with two cores and two workers, each file took a third more CPU. Set before Polars is
# first imported (it reads the variable then); a user's own setting wins.
os.environ.setdefault("POLARS_MAX_THREADS", "1")
