"""TUI tests: a fixed time zone so clock columns in screenshots never vary."""

from __future__ import annotations

import os
import time

os.environ["TZ"] = "UTC"
time.tzset()
