"""`python -m splitfuse` runs the `splitfuse` command."""

import sys

from splitfuse.entrypoints.cli import main

sys.exit(main())
