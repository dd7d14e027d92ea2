"""matplotlib's pyplot for the benchmarks' pictures, or None (with a note) when it is not installed."""

from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType | None:
    """pyplot on the file-only Agg backend; None, after saying what to install, without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no picture (pip install matplotlib)")
        return None
    return plt
