"""jaxopt_lab: normalization, gradient centralization and gradient accumulation for JAX, Flax and optax.

The library is six modules, imported on demand so that ``import jaxopt_lab`` stays cheap:

* :mod:`jaxopt_lab.normalization`: batch, layer, instance and group norm as pure functions;
* :mod:`jaxopt_lab.nn` and :mod:`jaxopt_lab.nnx`: the same as Flax linen and NNX modules;
* :mod:`jaxopt_lab.centralization`: Gradient Centralization as optax transforms;
* :mod:`jaxopt_lab.accumulation`: micro-batched gradients inside one jitted step;
* :mod:`jaxopt_lab.parallel`: data-parallel training steps over every visible device.

The experiments that measure them live in :mod:`jaxopt_lab.lab`, which imports the library and is never
imported by it.

>>> import jax.numpy as jnp
>>> from jaxopt_lab import normalization
>>> y = normalization.layer_norm(jnp.arange(6.0).reshape(2, 3))
>>> [round(float(v), 3) for v in y[0]]
[-1.225, 0.0, 1.225]
"""

__version__ = "0.1.0"
