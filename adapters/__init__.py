"""Framework adapters of interop, installed as the package ``interop.adapters``.

Each adapter lives in its own sub-package with the same file names
(``importer.py`` for framework -> IR; later ``emitter.py``/``backend.py`` for
IR -> framework) and exposes an ``ADAPTER`` object registered through the
``interop.adapters`` entry-point group.
"""
