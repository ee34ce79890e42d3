"""Framework adapters of interop, installed as the package ``interop.adapters``.

Each adapter lives in its own sub-package with the same file names
(``capture.py`` and ``capture_*.py`` for framework -> IR; ``emitter.py``,
``native_*.py`` and ``backend.py`` for IR -> framework) and exposes an ``ADAPTER`` object registered through the
``interop.adapters`` entry-point group.
"""
