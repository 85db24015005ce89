"""Matplotlib for every stage's PNGs: the headless backend, and files written atomically."""

from __future__ import annotations

import io
from pathlib import Path

from kdtrain import atomic


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: stages run on machines with no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> Path:
    """Render ``fig`` and write it atomically (a reader never sees half a PNG); closes it."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    pyplot().close(fig)
    atomic.write_bytes(path, buffer.getvalue())
    return path
