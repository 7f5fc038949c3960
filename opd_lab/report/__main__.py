"""``python -m opd_lab.report <sweep dirs> [--out DIR]``: the sweep report (see :mod:`opd_lab.report.cli`)."""

import sys

from opd_lab.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
