"""The experiments behind ``jaxopt-lab run`` (installed as ``jaxopt_lab.lab.experiments``).

One module per experiment, each defining ``EXPERIMENT``; see :mod:`jaxopt_lab.lab.experiment`.
"""
