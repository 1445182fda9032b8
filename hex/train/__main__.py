"""``python -m hex.train`` (and ``torchrun ... -m hex.train``): stage 04, see :mod:`hex.train.stage`."""

import sys

from hex.train.stage import main

sys.exit(main())
