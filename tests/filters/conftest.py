"""The filter tests compare with `tests/datacomp_reference.py`, a row-by-row re-statement of DataComp."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
