"""``python -m hex.test`` (and ``torchrun ... -m hex.test``): stage 05, see :mod:`hex.evaluate.stage`."""

import sys

if __name__ == "__main__":
    from hex.evaluate.stage import main

    sys.exit(main())
