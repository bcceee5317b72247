#!/usr/bin/env python
"""Train the musefast demo model from scratch (same as ``musefast train-demo``).

    python scripts/train_demo.py -o demo-model            # the full run (<= 60 min on 2 cores)
    python scripts/train_demo.py --quick -o /tmp/quick     # 1-2 minute smoke run
    python scripts/train_demo.py --estimate                # projected full-run time on this machine
"""
import sys

from musefast.training.demo import main

if __name__ == "__main__":
    sys.exit(main())
