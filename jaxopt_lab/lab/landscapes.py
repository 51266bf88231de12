"""Test functions for the optimizer experiments: three saddles and a synthetic regression problem.

Every loss has the engine's signature ``loss(params, batch) -> scalar`` (see :mod:`jaxopt_lab.lab.sweep`);
the saddles ignore ``batch``. Parameters of the saddles are one vector ``theta``.

Saddles (the course notes (docs/claims.md) c):

* ``cubic``: f(x) = x^3 at x = 0 — first and second derivatives vanish; from x > 0 gradient descent creeps
  towards 0 like x_t ~ 1 / (3 lr t) and never passes it, while the function decreases without bound for x < 0.
* ``hyperbolic``: f(x, y) = x^2 - y^2 at the origin — Hessian diag(2, -2); the x axis (y = 0) is the
  stable manifold: a start on it converges to the saddle under every gradient method.
* ``two_weight_net``: f(a, b) = (1 - a b)^2, the squared error of the two-weight linear net y = a b x
  fitted to (x, y) = (1, 1) — a saddle of a real model at a = b = 0 with Hessian [[0, -2], [-2, 0]]:
  stable manifold a = -b, escape along a = b towards the minima a b = 1.

Synthetic regression (the course notes (docs/claims.md), defined openly because the course notes' notebook is
not available):
``y = X w* + b* + noise`` with ``X ~ N(0, I)``, ``w* ~ N(0, weight_scale^2 I)``, ``b* ~ N(0, weight_scale^2)``,
``noise ~ N(0, noise_std^2)``; model ``x @ w + b``; loss: mean squared error (not halved), so its
Hessian is ``2/n [X 1]^T [X 1]`` and gradient descent is stable exactly for ``lr < 2 / lambda_max``.

>>> theta = jnp.array([0.0, 0.0])
>>> float(hyperbolic(theta)), float(two_weight_net(theta))
(0.0, 1.0)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SADDLES",
    "Regression",
    "Saddle",
    "cubic",
    "hyperbolic",
    "init_linear",
    "linear_model",
    "make_regression",
    "mse_loss",
    "regression_curvature",
    "two_weight_net",
]


def cubic(theta: jax.Array, batch: Any = None) -> jax.Array:
    """f(x) = x^3 (``theta`` has one entry)."""
    del batch
    return theta[0] ** 3


def hyperbolic(theta: jax.Array, batch: Any = None) -> jax.Array:
    """f(x, y) = x^2 - y^2."""
    del batch
    return theta[0] ** 2 - theta[1] ** 2


def two_weight_net(theta: jax.Array, batch: Any = None) -> jax.Array:
    """f(a, b) = (1 - a b)^2: squared error of y = a b x on the single example (x, y) = (1, 1)."""
    del batch
    return (1.0 - theta[0] * theta[1]) ** 2


class Saddle(NamedTuple):
    """A saddle point of ``loss``: where it is, its value, and the directions that attract or repel."""

    name: str
    formula: str
    loss: Any
    point: tuple[float, ...]
    value: float
    stable_direction: tuple[float, ...]  # gradient descent started along it converges to the saddle
    unstable_direction: tuple[float, ...]  # the way out


SADDLES: dict[str, Saddle] = {
    "cubic": Saddle("cubic", "x^3", cubic, (0.0,), 0.0, (1.0,), (-1.0,)),
    "hyperbolic": Saddle("hyperbolic", "x^2 - y^2", hyperbolic, (0.0, 0.0), 0.0, (1.0, 0.0), (0.0, 1.0)),
    "two_weight_net": Saddle("two_weight_net", "(1 - ab)^2", two_weight_net, (0.0, 0.0), 1.0,
                             (1.0, -1.0), (1.0, 1.0)),
}


class Regression(NamedTuple):
    """A synthetic linear-regression data set and the parameters that generated it."""

    data: dict[str, jax.Array]  # {"x": (n, d), "y": (n,)}
    true_params: dict[str, jax.Array]  # {"w": (d,), "b": ()}
    noise_std: float


def make_regression(seed: int, num_samples: int = 200, num_features: int = 5, *, noise_std: float = 0.1,
                    weight_scale: float = 2.0) -> Regression:
    """Draws ``y = X w* + b* + noise`` (see the module docstring) from ``jax.random.PRNGKey(seed)``.

    The loss floor is about ``noise_std^2`` (0.01 by default), below the course notes' target of 0.1.

    >>> problem = make_regression(0, num_samples=8, num_features=3)
    >>> problem.data["x"].shape, problem.data["y"].shape
    ((8, 3), (8,))
    """
    for name, value in (("num_samples", num_samples), ("num_features", num_features)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"make_regression: {name} must be a positive int, got {value!r}")
    if noise_std < 0:
        raise ValueError(f"make_regression: noise_std must be >= 0, got {noise_std!r}")
    kx, kw, kb, kn = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(kx, (num_samples, num_features))
    w = weight_scale * jax.random.normal(kw, (num_features,))
    b = weight_scale * jax.random.normal(kb, ())
    y = x @ w + b + noise_std * jax.random.normal(kn, (num_samples,))
    return Regression({"x": x, "y": y}, {"w": w, "b": b}, noise_std)


def linear_model(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """``x @ w + b``."""
    return x @ params["w"] + params["b"]


def mse_loss(params: dict[str, jax.Array], batch: dict[str, jax.Array]) -> jax.Array:
    """Mean squared error of :func:`linear_model` on ``batch = {"x", "y"}``."""
    return jnp.mean((linear_model(params, batch["x"]) - batch["y"]) ** 2)


def init_linear(num_features: int, scale: float = 0.0):
    """``key -> params``: zeros (``scale=0``) or ``N(0, scale^2)`` entries, for :func:`sweep.grid`."""

    def init(key: jax.Array) -> dict[str, jax.Array]:
        kw, kb = jax.random.split(key)
        return {"w": scale * jax.random.normal(kw, (num_features,)), "b": scale * jax.random.normal(kb, ())}

    return init


def regression_curvature(data: dict[str, jax.Array]) -> np.ndarray:
    """Eigenvalues (ascending) of the MSE Hessian ``2/n [X 1]^T [X 1]``: the problem's conditioning.

    Gradient descent converges iff ``lr < 2 / max``; its slowest mode shrinks by ``|1 - lr * min|`` a step.
    """
    x = np.asarray(data["x"], dtype=np.float64)
    design = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    return np.linalg.eigvalsh(2.0 / x.shape[0] * design.T @ design)
