"""``python -m preprocess.quantify``."""

from preprocess.quantify.stage import main

raise SystemExit(main())
