"""``python -m prunekit`` (and ``torchrun --nproc-per-node N -m prunekit ...``): the command line."""

import sys

from prunekit.cli import main

sys.exit(main())
