"""Small Flax models for the real-data experiments, each taking a normalization by name.

Three models, all ``model.apply(variables, images, train=...)`` on NHWC images and returning logits:

- :class:`CNN`: 3x3 convolutions, each followed by the chosen norm and a ReLU, one 2x2 average pool,
  global average pooling and a linear classifier (the layout of the Group Norm paper's comparison,
  scaled down to 8x8 digits).
- :class:`MLP`: the flattened image through ``Dense -> norm -> ReLU`` blocks.
- :class:`RowRNN`: the image read row by row as a sequence (an Elman RNN,
  ``h_t = tanh(norm(W_x x_t + W_h h_{t-1}))``), classifying from the last hidden state. The norm module
  is *shared across time steps*, as a drop-in norm would be, so batch norm mixes the statistics of every
  step into one running average: the setting in which "BN suits RNNs poorly" is usually claimed.

``norm`` is one of :data:`NORMS`; every norm comes from :mod:`jaxopt_lab.nn`:

============  ===========================================================  =====================
name          statistics per                                               depends on the batch
============  ===========================================================  =====================
``none``      (no normalization; layers get a bias instead)                no
``batch``     channel, over (batch, H, W)                                  yes (train mode)
``layer``     example, over (H, W, C)                                      no
``instance``  example and channel, over (H, W)                             no
``group``     example and group of C/G channels, over (H, W, C/G)           no
============  ===========================================================  =====================

>>> import jax, jax.numpy as jnp
>>> from jaxopt_lab.models import CNN
>>> model = CNN(norm="group", num_groups=4)
>>> variables = model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)))
>>> model.apply(variables, jnp.zeros((2, 8, 8, 1))).shape
(2, 10)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxopt_lab import nn as norms

__all__ = ["CNN", "MLP", "NORMS", "Logistic", "Norm", "RowRNN", "make_norm"]

Norm = Literal["none", "batch", "layer", "instance", "group"]
NORMS: tuple[str, ...] = ("none", "batch", "layer", "instance", "group")
# PyTorch's default (its momentum 0.1 is Flax's 0.9). Flax's own default, 0.99, needs ~500 steps to forget
# the initial (0, 1) running statistics; a few epochs at batch 64 are fewer steps than that.
BN_MOMENTUM = 0.9


def _check_norm(norm: str, owner: str, allowed: Sequence[str] = NORMS) -> None:
    if norm not in allowed:
        raise ValueError(f"{owner}: norm must be one of {', '.join(map(repr, allowed))}, got {norm!r}")


def make_norm(norm: str, *, train: bool, num_groups: int = 8, spatial: bool = True,
              bn_momentum: float = BN_MOMENTUM, name: str | None = None) -> Callable[[jax.Array], jax.Array]:
    """The normalization layer called ``norm`` (a :mod:`jaxopt_lab.nn` module), or the identity for ``none``.

    Call it inside a ``@nn.compact`` method. ``spatial`` says whether the input has spatial axes
    ``(N, H, W, C)``; without them (``(N, C)``) instance norm is undefined and raises.

    Args:
      norm: one of :data:`NORMS`.
      train: batch norm uses the batch's statistics (and updates ``batch_stats``) when ``True``, its
        running averages when ``False``; the other norms ignore it.
      num_groups: groups of group norm; must divide the channel count.
      spatial: the input is ``(N, H, W, C)`` rather than ``(N, C)``.
      bn_momentum: batch norm's running-average decay (Flax convention).
      name: the submodule's name.
    """
    _check_norm(norm, "make_norm")
    if norm == "none":
        return lambda x: x
    if norm == "batch":
        return norms.BatchNorm(use_running_average=not train, momentum=bn_momentum, name=name)
    if norm == "layer":
        # The Group Norm paper's LN for conv features: one mean/variance per example over (H, W, C),
        # a scale and shift per channel.
        axes = (-3, -2, -1) if spatial else -1
        return norms.LayerNorm(reduction_axes=axes, name=name)
    if norm == "instance":
        if not spatial:
            raise ValueError("make_norm: instance norm needs spatial axes (N, H, W, C); this layer's input "
                             "is (N, features)")
        return norms.InstanceNorm(name=name)
    return norms.GroupNorm(num_groups=num_groups, name=name)


class CNN(nn.Module):
    """Conv(3x3) -> norm -> ReLU blocks, a 2x2 average pool after block ``pool_after``, GAP, Dense.

    Attributes:
      norm: one of :data:`NORMS`.
      num_classes: outputs.
      widths: channels of each conv block; every width must be divisible by ``num_groups`` for group norm.
      pool_after: indices of the blocks followed by a 2x2 average pool (stride 2).
      num_groups: groups of group norm.
    """

    norm: str = "batch"
    num_classes: int = 10
    widths: Sequence[int] = (16, 32, 32)
    pool_after: Sequence[int] = (1,)
    num_groups: int = 8

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        _check_norm(self.norm, "CNN")
        if x.ndim != 4:
            raise ValueError(f"CNN: expected images (N, H, W, C), got shape {x.shape}")
        for i, width in enumerate(self.widths):
            if self.norm == "group" and width % self.num_groups:
                raise ValueError(f"CNN: group norm needs every width divisible by num_groups="
                                 f"{self.num_groups}, got width {width} in block {i}")
            # A norm's shift makes a conv bias redundant; without a norm the conv keeps its bias.
            x = nn.Conv(width, (3, 3), use_bias=self.norm == "none", name=f"conv{i}")(x)
            x = make_norm(self.norm, train=train, num_groups=self.num_groups, name=f"norm{i}")(x)
            x = nn.relu(x)
            if i in self.pool_after:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


class Logistic(nn.Module):
    """Multinomial logistic regression: the flattened input through one ``Dense`` layer (linear baseline)."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no state that differs between training and evaluation
        return nn.Dense(self.num_classes, name="head")(x.reshape(x.shape[0], -1))


class MLP(nn.Module):
    """Flatten, then ``Dense -> norm -> ReLU`` per hidden width, then a linear classifier.

    ``norm`` may be ``none``, ``batch``, ``layer`` or ``group`` (instance norm needs spatial axes).
    """

    norm: str = "none"
    num_classes: int = 10
    widths: Sequence[int] = (128, 128)
    num_groups: int = 8

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        _check_norm(self.norm, "MLP", ("none", "batch", "layer", "group"))
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.widths):
            x = nn.Dense(width, use_bias=self.norm == "none", name=f"dense{i}")(x)
            x = make_norm(self.norm, train=train, num_groups=self.num_groups, spatial=False, name=f"norm{i}")(x)
            x = nn.relu(x)
        return nn.Dense(self.num_classes, name="head")(x)


class RowRNN(nn.Module):
    """An Elman RNN over the image's rows: ``h_t = tanh(norm(W_x x_t + W_h h_{t-1} + b))``, then Dense.

    The image ``(N, H, W, C)`` is a sequence of ``H`` steps of ``W * C`` features. One norm module is
    applied at every step (shared parameters and, for batch norm, shared running statistics).
    ``norm`` may be ``none``, ``batch`` or ``layer``.
    """

    norm: str = "layer"
    num_classes: int = 10
    hidden: int = 64

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        _check_norm(self.norm, "RowRNN", ("none", "batch", "layer"))
        if x.ndim != 4:
            raise ValueError(f"RowRNN: expected images (N, H, W, C), got shape {x.shape}")
        rows = x.reshape(x.shape[0], x.shape[1], -1)
        input_proj = nn.Dense(self.hidden, use_bias=self.norm == "none", name="input")
        recurrent = nn.Dense(self.hidden, use_bias=False, name="recurrent")
        norm = make_norm(self.norm, train=train, spatial=False, name="norm")
        h = jnp.zeros((x.shape[0], self.hidden), x.dtype)
        for t in range(rows.shape[1]):  # a handful of rows: unrolled, so XLA fuses across steps
            h = jnp.tanh(norm(input_proj(rows[:, t]) + recurrent(h)))
        return nn.Dense(self.num_classes, name="head")(h)
