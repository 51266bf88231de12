"""The lab: the experiments, their runner and CLI, and the benchmark suite, built on the library.

Nothing in the library (``jaxopt_lab.normalization``, ``nn``, ``nnx``, ``centralization``,
``accumulation``, ``parallel``) imports from here; the lab imports the library like any user would.
"""
