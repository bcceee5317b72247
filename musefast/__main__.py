"""``python -m musefast``: the same command line as ``musefast``."""
import sys

from musefast.cli import main

sys.exit(main())
