"""`python -m mecoq_hf.cli ...` (used by `accelerate launch -m mecoq_hf.cli ...`)."""

import sys

from .commands import main

sys.exit(main())
