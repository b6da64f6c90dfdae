"""``python -m mtop.ctl``: mtopctl without its console script (the tests and
benchmarks run it so, with the interpreter they run under)."""

import sys

from mtop.ctl import main

sys.exit(main())
