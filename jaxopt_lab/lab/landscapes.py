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

Each saddle is also the mean of per-example losses over a data set (:func:`saddle_examples`), so that a
mini-batch gradient carries the noise real sampling gives, not an assumed one:

* ``two_weight_net``: the net's squared error example by example, ``(y_i - a b x_i)^2`` with
  ``mean(x^2) = mean(x y) = 1`` and ``mean(y^2) = 1 + s^2``: the mean is ``(1 - a b)^2 + s^2``, the
  landscape plus the residual variance ``s^2`` that no (a, b) can fit. Every per-example loss depends on
  (a, b) through ``a b`` alone, so its gradient is ``c_i (b, a)``: on the stable manifold a = -b that is
  ``c_i (-a, a)``, along the manifold. This holds for every data set: each example's loss is unchanged by
  ``(a, b) -> (-b, -a)``, and the manifold is that symmetry's fixed line, which no gradient of a symmetric
  loss can leave.
* ``hyperbolic``: ``u_i^2 x^2 - w_i^2 y^2`` with ``mean(u^2) = mean(w^2) = 1``: each example has the saddle,
  its own curvatures, and the stable manifold y = 0.
* ``cubic``: ``u_i^2 x^3`` with ``mean(u^2) = 1``: each example has the flat point at 0.

In all three the examples share the saddle point and its stable manifold, as the examples of the net must.
Per-example losses with their own linear terms, ``f(theta) + g_i . theta`` with ``mean(g) = 0`` (saddles at
scattered points), would give a gradient noise ``g_i`` that does not depend on ``theta``: the additive
Gaussian stand-in of the sweeps is that case.

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
    "SaddleExamples",
    "cubic",
    "cubic_examples",
    "hyperbolic",
    "hyperbolic_examples",
    "init_linear",
    "linear_model",
    "make_regression",
    "mse_loss",
    "regression_curvature",
    "saddle_examples",
    "two_weight_net",
    "two_weight_net_examples",
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


def two_weight_net_examples(theta: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    """Mean over ``batch = {"x", "y"}`` of ``(y_i - a b x_i)^2``: the two-weight net's squared error."""
    return jnp.mean((batch["y"] - theta[0] * theta[1] * batch["x"]) ** 2)


def hyperbolic_examples(theta: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    """Mean over ``batch = {"u", "w"}`` of ``u_i^2 x^2 - w_i^2 y^2``."""
    return jnp.mean(batch["u"] ** 2 * theta[0] ** 2 - batch["w"] ** 2 * theta[1] ** 2)


def cubic_examples(theta: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    """Mean over ``batch = {"u"}`` of ``u_i^2 x^3``."""
    return jnp.mean(batch["u"] ** 2 * theta[0] ** 3)


class SaddleExamples(NamedTuple):
    """A data set whose per-example losses average to a saddle's landscape plus a constant ``offset``."""

    saddle: Saddle
    loss: Any  # (theta, batch) -> the mean of the per-example losses over the batch
    data: dict[str, jax.Array]  # arrays with a leading examples axis
    value: float  # the mean loss over all examples at the saddle point: saddle.value + offset
    offset: float  # the mean loss minus the landscape: s^2 for the net, 0 for the others
    per_example: str  # the per-example loss, for summaries


def _unit_mean_square(rng: np.random.Generator, num_examples: int) -> np.ndarray:
    """Standard normal draws rescaled so that their mean square is exactly 1 (in float64)."""
    z = rng.standard_normal(num_examples)
    return z / np.sqrt(np.mean(z ** 2))


def _net_examples(rng: np.random.Generator, n: int, residual_std: float) -> tuple:
    x = _unit_mean_square(rng, n)
    residual = rng.standard_normal(n)
    residual -= np.mean(residual * x) * x  # orthogonal to x, so mean(x y) = mean(x^2) = 1
    residual *= residual_std / np.sqrt(np.mean(residual ** 2))
    return {"x": x, "y": x + residual}, two_weight_net_examples, residual_std ** 2, "(y_i - a b x_i)^2"


def _hyperbolic_examples(rng: np.random.Generator, n: int, residual_std: float) -> tuple:
    del residual_std  # the net's only
    data = {"u": _unit_mean_square(rng, n), "w": _unit_mean_square(rng, n)}
    return data, hyperbolic_examples, 0.0, "u_i^2 x^2 - w_i^2 y^2"


def _cubic_examples(rng: np.random.Generator, n: int, residual_std: float) -> tuple:
    del residual_std
    return {"u": _unit_mean_square(rng, n)}, cubic_examples, 0.0, "u_i^2 x^3"


# saddle name -> (rng, num_examples, residual_std) -> (data, per-example loss, offset, formula)
_EXAMPLES = {"two_weight_net": _net_examples, "hyperbolic": _hyperbolic_examples, "cubic": _cubic_examples}


def saddle_examples(name: str, num_examples: int, seed: int, *, residual_std: float = 0.5) -> SaddleExamples:
    """A data set of ``num_examples`` whose per-example losses average to the saddle ``name``'s landscape.

    The moments the module docstring states hold exactly in float64 (the features are rescaled, the
    net's residual made orthogonal to ``x``) and to float32 rounding in the returned arrays;
    ``residual_std`` is the net's ``s``. Drawn with ``numpy.random.default_rng(seed)``.

    >>> ex = saddle_examples("two_weight_net", 256, seed=0)
    >>> ex.per_example, round(ex.offset, 4), round(ex.value, 4)
    ('(y_i - a b x_i)^2', 0.25, 1.25)
    >>> theta = jnp.array([0.3, 0.7])
    >>> bool(jnp.isclose(ex.loss(theta, ex.data), two_weight_net(theta) + ex.offset, rtol=1e-5))
    True
    """
    if name not in SADDLES:
        raise ValueError(f"saddle_examples: unknown saddle {name!r}; expected one of {sorted(SADDLES)}")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 2:
        raise ValueError(f"saddle_examples: num_examples must be an int >= 2, got {num_examples!r}")
    if not residual_std >= 0:
        raise ValueError(f"saddle_examples: residual_std must be >= 0, got {residual_std!r}")
    data, loss, offset, formula = _EXAMPLES[name](np.random.default_rng(seed), num_examples, residual_std)
    saddle = SADDLES[name]
    data = {key: jnp.asarray(value, jnp.float32) for key, value in data.items()}
    value = float(loss(jnp.asarray(saddle.point, jnp.float32), data))
    return SaddleExamples(saddle, loss, data, value, float(offset), formula)


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
