"""``python -m coopsgd.cli ...``: the ``coopsgd`` command."""

from __future__ import annotations

import sys

from coopsgd.cli import main

if __name__ == "__main__":
    sys.exit(main())
