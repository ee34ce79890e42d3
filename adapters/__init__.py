"""Framework adapters of interop, installed as the package ``interop.adapters``.

Each framework has one sub-package with the same file name for the same role: the
capture side (framework -> IR: ``capture.py`` and ``capture_*.py``, exposed as
``ADAPTER`` through the ``interop.adapters`` entry-point group), the emit side (IR ->
framework: ``emitter.py`` and ``emit_*.py``, exposed as ``HOST`` through the
``interop.hosts`` group, with ``host.py`` and ``nesting.py``) and ``backend.py``, the
backend protocol on that framework. docs/design.md draws the layout.
"""
