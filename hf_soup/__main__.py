"""`python -m hf_soup ...` (and `accelerate launch -m hf_soup ...`) runs the `hf-soup` CLI."""

import sys

from .cli import main

sys.exit(main())
