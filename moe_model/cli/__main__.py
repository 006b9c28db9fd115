"""`python -m moe_model.cli ...`: the same as the `moe` console script (calibration starts runs this way)."""

import sys

from . import main

sys.exit(main())
