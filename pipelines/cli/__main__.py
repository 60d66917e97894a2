"""`python -m pipelines.cli`: the `segpipe` command."""

import sys

from pipelines.cli import main

sys.exit(main())
