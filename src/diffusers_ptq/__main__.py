"""`python -m diffusers_ptq ...` runs the `diffusers-ptq` command (what `torchrun -m` also runs)."""

import sys

from diffusers_ptq.cli import main

if __name__ == "__main__":
    sys.exit(main())
