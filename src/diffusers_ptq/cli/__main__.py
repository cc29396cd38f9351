"""`python -m diffusers_ptq.cli ...` runs the `diffusers-ptq` command."""

import sys

from diffusers_ptq.cli import main

sys.exit(main())
