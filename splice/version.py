"""splice's version, in a module of its own so that every layer can read it.

``splice.__version__`` re-exports it; code inside splice imports it from here (the IR and
the runtime write it into saved programs and artifacts) rather than from the package face,
which sits above them.
"""

__version__ = "0.1.0"
