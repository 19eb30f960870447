"""`python -m services.cli`: the `pipelines` command."""

from __future__ import annotations

import sys

from services.cli import main

sys.exit(main())
