"""`python -m splitfuse.bench {serve,offline,plot} ...` — the same commands as `splitfuse bench`."""

import sys

from splitfuse.bench.cli import main

sys.exit(main())
