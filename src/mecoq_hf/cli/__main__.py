"""`python -m mecoq_hf.cli ...` (used by `accelerate launch -m mecoq_hf.cli ...`)."""

import sys

from . import main

sys.exit(main())
