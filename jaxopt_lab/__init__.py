"""jaxopt_lab: gradient accumulation, normalization, gradient centralization and optimizer behaviour.

The library modules are imported on demand so that ``import jaxopt_lab`` stays cheap:

>>> from jaxopt_lab import seed_network
>>> float(seed_network.forward(seed_network.PARAMS, seed_network.INPUTS)["o2"])
-1.5
"""

__version__ = "0.1.0"
