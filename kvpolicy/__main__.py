"""``python -m kvpolicy``: the ``kvpolicy`` command, also as ``torchrun --nproc-per-node N -m kvpolicy ...``."""

import sys

from kvpolicy.cli import main

sys.exit(main())
