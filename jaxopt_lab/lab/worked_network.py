"""The course notes' 2-2-2 ReLU network (docs/claims.md): forward, hand-derived backward, loss terms.

    z1 = i1*w11 + i2*w21 + b1,  h1 = ReLU(z1)        o1 = h1*w31 + h2*w41 + b3
    z2 = i1*w12 + i2*w22 + b2,  h2 = ReLU(z2)        o2 = h1*w32 + h2*w42 + b4
    E1 = 1/2 (t1 - o1)^2,  E2 = 1/2 (t2 - o2)^2,  E = E1 + E2 (equal to the course notes' MSE here)

``hand_gradients`` writes the chain rule out as plain arithmetic (no autodiff), for the total loss and
for each term, so the tests can hold it against ``jax.grad``. The course notes' worked example differentiates
only the term on the path it follows (E1 for w21, E2 for w12); the total-loss gradient of w21 differs.

>>> import jax
>>> grads = hand_gradients(PARAMS, INPUTS, TARGETS)
>>> float(grads.e1["w21"]), float(grads.total["w21"])
(0.5, -1.5)
>>> float(jax.grad(total_loss)(PARAMS, INPUTS, TARGETS)["w21"])
-1.5
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "INPUTS",
    "PARAMS",
    "PARAM_NAMES",
    "TARGETS",
    "HandGradients",
    "forward",
    "gradient_step",
    "hand_gradients",
    "loss_terms",
    "mse",
    "total_loss",
]

PARAM_NAMES = ("w11", "w12", "w21", "w22", "w31", "w32", "w41", "w42", "b1", "b2", "b3", "b4")

# The course notes' table (docs/claims.md).
PARAMS: dict[str, float] = {
    "w11": 1.0, "w12": -0.5, "w21": 0.5, "w22": -1.0,
    "w31": 0.5, "w32": -1.0, "w41": -0.5, "w42": 1.0,
    "b1": 0.5, "b2": -0.5, "b3": -1.0, "b4": 0.5,
}
INPUTS = (2.0, -1.0)
TARGETS = (1.0, 0.5)

Params = Mapping[str, ArrayLike]
# Two values (i1, i2) or (t1, t2): a pair of scalars or an array of length 2.
Pair: TypeAlias = tuple[ArrayLike, ArrayLike] | jax.Array | np.ndarray


def _check_params(params: Params) -> None:
    missing = set(PARAM_NAMES) - set(params)
    if missing:
        raise ValueError(f"params: missing {sorted(missing)}; expected the keys {list(PARAM_NAMES)}")


def forward(params: Params, inputs: Pair) -> dict[str, jax.Array]:
    """Every intermediate of the forward pass: ``z1, z2, h1, h2, o1, o2``."""
    _check_params(params)
    i1, i2 = inputs[0], inputs[1]
    p = params
    z1 = i1 * p["w11"] + i2 * p["w21"] + p["b1"]
    z2 = i1 * p["w12"] + i2 * p["w22"] + p["b2"]
    h1, h2 = jax.nn.relu(z1), jax.nn.relu(z2)
    o1 = h1 * p["w31"] + h2 * p["w41"] + p["b3"]
    o2 = h1 * p["w32"] + h2 * p["w42"] + p["b4"]
    return {k: jnp.asarray(v) for k, v in
            {"z1": z1, "z2": z2, "h1": h1, "h2": h2, "o1": o1, "o2": o2}.items()}


def loss_terms(params: Params, inputs: Pair,
               targets: Pair) -> tuple[jax.Array, jax.Array]:
    """``(E1, E2)`` with ``Ek = 1/2 (tk - ok)^2``."""
    out = forward(params, inputs)
    return 0.5 * (jnp.asarray(targets[0]) - out["o1"]) ** 2, 0.5 * (jnp.asarray(targets[1]) - out["o2"]) ** 2


def total_loss(params: Params, inputs: Pair,
               targets: Pair) -> jax.Array:
    """``E = E1 + E2``."""
    e1, e2 = loss_terms(params, inputs, targets)
    return e1 + e2


def mse(params: Params, inputs: Pair,
        targets: Pair) -> jax.Array:
    """The course notes' MSE, ``((t1-o1)^2 + (t2-o2)^2) / 2``; with two outputs it equals ``E1 + E2``."""
    out = forward(params, inputs)
    return ((jnp.asarray(targets[0]) - out["o1"]) ** 2 + (jnp.asarray(targets[1]) - out["o2"]) ** 2) / 2


class HandGradients(NamedTuple):
    """Hand-derived gradients: of the total loss and of each term, keyed like ``PARAMS``."""

    total: dict[str, jax.Array]
    e1: dict[str, jax.Array]
    e2: dict[str, jax.Array]


def _term_gradient(p: Params, i1: ArrayLike, i2: ArrayLike, h1: ArrayLike, h2: ArrayLike,
                   relu1: ArrayLike, relu2: ArrayLike, d_o1: ArrayLike,
                   d_o2: ArrayLike) -> dict[str, jax.Array]:
    """Chain rule from the output errors ``dE/do1, dE/do2`` back to every parameter."""
    # Output layer: o1 = h1*w31 + h2*w41 + b3, o2 = h1*w32 + h2*w42 + b4.
    grads = {"w31": d_o1 * h1, "w41": d_o1 * h2, "b3": d_o1,
             "w32": d_o2 * h1, "w42": d_o2 * h2, "b4": d_o2}
    # Back through the hidden units; ReLU'(z) is 1 for z > 0 and 0 otherwise (as jax.nn.relu's).
    d_z1 = (d_o1 * p["w31"] + d_o2 * p["w32"]) * relu1
    d_z2 = (d_o1 * p["w41"] + d_o2 * p["w42"]) * relu2
    grads |= {"w11": d_z1 * i1, "w21": d_z1 * i2, "b1": d_z1,
              "w12": d_z2 * i1, "w22": d_z2 * i2, "b2": d_z2}
    return {k: jnp.asarray(grads[k], dtype=jnp.result_type(float)) for k in PARAM_NAMES}


def hand_gradients(params: Params, inputs: Pair,
                   targets: Pair) -> HandGradients:
    """The gradient of ``E``, ``E1`` and ``E2`` for all 12 parameters, by the chain rule alone.

    ``dE1/do1 = o1 - t1`` and ``dE2/do2 = o2 - t2``; each term's gradient starts from its own output
    error with the other output's error set to zero, and the total is their sum.
    """
    out = forward(params, inputs)
    i1, i2 = inputs[0], inputs[1]
    relu1 = (out["z1"] > 0).astype(out["z1"].dtype)
    relu2 = (out["z2"] > 0).astype(out["z2"].dtype)
    err1, err2 = out["o1"] - targets[0], out["o2"] - targets[1]
    zero = jnp.zeros_like(err1)
    common = (params, i1, i2, out["h1"], out["h2"], relu1, relu2)
    return HandGradients(total=_term_gradient(*common, err1, err2),
                         e1=_term_gradient(*common, err1, zero),
                         e2=_term_gradient(*common, zero, err2))


def gradient_step(params: Params, grads: Mapping[str, ArrayLike],
                  learning_rate: float = 0.1) -> dict[str, jax.Array]:
    """One step of plain gradient descent, ``w <- w - learning_rate * dw``."""
    return {k: jnp.asarray(params[k] - learning_rate * grads[k]) for k in PARAM_NAMES}
