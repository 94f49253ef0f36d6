"""``python -m coopsgd ...``: the ``coopsgd`` command (:func:`coopsgd.cli.main`)."""

from __future__ import annotations

import sys

from coopsgd.cli import main

if __name__ == "__main__":
    sys.exit(main())
