"""Imported by the zygote on a warm request (tests/unit/zygote_probe.py): records
which process imported it."""

from __future__ import annotations

import os
from pathlib import Path

Path(os.environ["DATAFLARE_TEST_WARM_MARKER"]).write_text(str(os.getpid()))


class Thing:
    pass
