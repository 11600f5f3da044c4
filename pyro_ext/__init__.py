"""pyro_ext: research results on probabilistic modelling as plugins for GPyTorch, nflows and Pyro.

Each part lives in its own subpackage and plugs into the library its users already use
(see the README's table of parts). Importing :mod:`pyro_ext` itself imports no part, so that
``import pyro_ext`` stays cheap and a broken optional dependency of one part cannot break another.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
