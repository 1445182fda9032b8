"""``python -m hex.infer_wsi`` (and ``torchrun ... -m hex.infer_wsi``): stage 06, see :mod:`hex.infer.stage`."""

import sys

if __name__ == "__main__":
    from hex.infer.stage import main

    sys.exit(main())
