"""`tokensieve demo` (each shipped method on its task, with pictures of what it kept) and
`tokensieve show` (the keep maps of a user's own image)."""

from tokensieve.demo.run import DemoReport, DemoRow, run_demo

__all__ = ["DemoReport", "DemoRow", "run_demo"]
