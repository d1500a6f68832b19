"""How every command ends on bad input: one line naming the file and what to do, exit code 2.

A traceback means a bug in this project, so none is shown for an input the user can fix;
``DATACOMP_DEBUG=1`` in the environment shows it anyway (for a bug report), and so does a
call from Python (``main([...])``: tests and notebooks want the exception itself).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator, Sequence

DEBUG_ENV = "DATACOMP_DEBUG"


@contextmanager
def one_line_errors(argv: Sequence[str] | None, *errors: type[BaseException]) -> Iterator[None]:
    """Turn `errors` raised in the block into ``error: <message>`` on stderr and exit code 2,
    when the command runs from the shell (`argv` is None) and DATACOMP_DEBUG is not set."""
    try:
        yield
    except errors as exc:
        if argv is not None or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
