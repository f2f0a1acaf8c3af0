"""Progress lines of long work (training, sweeps), prefixed ``[ood-ray]``."""

from __future__ import annotations

import sys


def say(line: str) -> None:
    """Print one progress line; writes to stdout directly, bypassing Ray Train's print patch
    (which would echo it twice), and flushes so it shows at once under ``ray job submit``."""
    sys.stdout.write(f"[ood-ray] {line}\n")
    sys.stdout.flush()
