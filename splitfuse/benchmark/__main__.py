"""`python -m splitfuse.benchmark {serve,offline,plot} ...` — the same commands as `splitfuse bench`."""

import sys

from splitfuse.benchmark.cli import main

sys.exit(main())
