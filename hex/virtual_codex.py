"""``python -m hex.virtual_codex``: the virtual CODEX maps of predictions made earlier, see :mod:`hex.infer.maps`."""

import sys

if __name__ == "__main__":
    from hex.infer.maps import main

    sys.exit(main())
