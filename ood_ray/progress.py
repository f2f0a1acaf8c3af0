"""Progress lines of long work (training, sweeps), prefixed ``[ood-ray]``."""

from __future__ import annotations

import sys

from .config import redact


def say(line: str) -> None:
    """Print one progress line; writes to stdout directly, bypassing Ray Train's print patch
    (which would echo it twice), and flushes so it shows at once under ``ray job submit``.
    Credentials in URIs are masked (``config.redact``)."""
    sys.stdout.write(f"[ood-ray] {redact(line)}\n")
    sys.stdout.flush()
