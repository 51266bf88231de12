"""Small Flax models for the real-data experiments, each taking a normalization by name.

Every model is ``model.apply(variables, x, train=...)`` on channels-last inputs, images ``(N, H, W, C)``
(digits) or 1-D signals ``(N, L, C)`` (MNIST-1D), and returns logits:

- :class:`CNN`: same-padded convolutions (3x3 on images, 3 taps on signals; :class:`Conv`), each followed
  by the chosen norm and a ReLU, an average pool of 2 per axis, global average pooling and a linear
  classifier (the layout of the Group Norm paper's comparison, scaled down).
- :class:`ResidualCNN`: a stem convolution, then a configurable number of post-activation residual blocks
  (two normalized convolutions each, the last norm's scale starting at zero), global average pooling and a
  linear classifier: the depth axis of the Group Norm paper's ResNet-50, scaled down.
- :class:`MLP`: the flattened input through ``Dense -> norm -> ReLU`` blocks.
- :class:`Logistic`: multinomial logistic regression (one ``Dense``), the linear baseline.
- :class:`GRU`: the MNIST-1D paper's bidirectional GRU (Flax ``GRUCell`` under ``nn.RNN``), every step's
  output into a linear classifier.
- :class:`NormGRU`: a GRU whose cell (:class:`NormGRUCell`) normalizes its input and recurrent
  pre-activations separately, with layer norm (Ba et al. 2016) or batch norm with statistics per time step
  (Cooijmans et al. 2016), classifying from the last hidden state.

``norm`` is one of :data:`NORMS`; every norm comes from :mod:`jaxopt_lab.nn`:

============  ===========================================================  =====================
name          statistics per                                               depends on the batch
============  ===========================================================  =====================
``none``      (no normalization; layers get a bias instead)                no
``batch``     channel, over (batch, H, W) or (batch, L)                    yes (train mode)
``layer``     example, over (H, W, C) or (L, C)                            no
``instance``  example and channel, over (H, W) or (L)                      no
``group``     example and group of C/G channels, over (H, W, C/G)           no
============  ===========================================================  =====================

>>> import jax, jax.numpy as jnp
>>> from jaxopt_lab.lab.models import CNN
>>> model = CNN(norm="group", num_groups=4)
>>> variables = model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)))
>>> model.apply(variables, jnp.zeros((2, 8, 8, 1))).shape
(2, 10)
>>> model.apply(model.init(jax.random.key(0), jnp.zeros((2, 40, 1))), jnp.zeros((2, 40, 1))).shape
(2, 10)
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxopt_lab import nn as norms

__all__ = [
    "CNN",
    "GRU",
    "MLP",
    "NORMS",
    "RESIDUAL_NORMS",
    "RNN_NORMS",
    "Conv",
    "Logistic",
    "Norm",
    "NormGRU",
    "NormGRUCell",
    "ResidualCNN",
    "make_norm",
]

Norm = Literal["none", "batch", "layer", "instance", "group"]
NORMS: tuple[str, ...] = ("none", "batch", "layer", "instance", "group")
# The norms :class:`ResidualCNN` takes: its residual branches start at zero through a norm's scale.
RESIDUAL_NORMS: tuple[str, ...] = ("batch", "layer", "instance", "group")
# PyTorch's default (its momentum 0.1 is Flax's 0.9). Flax's own default, 0.99, needs ~500 steps to forget
# the initial (0, 1) running statistics; a few epochs at batch 64 are fewer steps than that.
BN_MOMENTUM = 0.9


def _check_norm(norm: str, owner: str, allowed: Sequence[str] = NORMS) -> None:
    if norm not in allowed:
        raise ValueError(f"{owner}: norm must be one of {', '.join(map(repr, allowed))}, got {norm!r}")


def make_norm(norm: str, *, train: bool, num_groups: int = 8, spatial_dims: int = 2,
              bn_momentum: float = BN_MOMENTUM, scale_init: nn.initializers.Initializer = nn.initializers.ones,
              name: str | None = None) -> Callable[[jax.Array], jax.Array]:
    """The normalization layer called ``norm`` (a :mod:`jaxopt_lab.nn` module), or the identity for ``none``.

    Call it inside a ``@nn.compact`` method. ``spatial_dims`` is the number of spatial axes of the input:
    2 for images ``(N, H, W, C)``, 1 for signals ``(N, L, C)``, 0 for features ``(N, C)`` (where instance
    norm is undefined and raises).

    Args:
      norm: one of :data:`NORMS`.
      train: batch norm uses the batch's statistics (and updates ``batch_stats``) when ``True``, its
        running averages when ``False``; the other norms ignore it.
      num_groups: groups of group norm; must divide the channel count.
      spatial_dims: 0, 1 or 2 spatial axes between the batch and the channel axis.
      bn_momentum: batch norm's running-average decay (Flax convention).
      scale_init: initializer of the norm's scale (``zeros`` makes it start as a zero map, e.g. a residual
        branch's last norm).
      name: the submodule's name.
    """
    _check_norm(norm, "make_norm")
    if isinstance(spatial_dims, bool) or spatial_dims not in (0, 1, 2):
        raise ValueError(f"make_norm: spatial_dims must be 0, 1 or 2, got {spatial_dims!r}")
    if norm == "none":
        return lambda x: x
    if norm == "batch":
        return norms.BatchNorm(use_running_average=not train, momentum=bn_momentum, scale_init=scale_init,
                               name=name)
    if norm == "layer":
        # The Group Norm paper's LN for conv features: one mean/variance per example over all its axes
        # ((H, W, C) or (L, C)), a scale and shift per channel.
        return norms.LayerNorm(reduction_axes=tuple(range(-spatial_dims - 1, 0)), scale_init=scale_init,
                               name=name)
    if norm == "instance":
        if not spatial_dims:
            raise ValueError("make_norm: instance norm needs spatial axes ((N, H, W, C) or (N, L, C)); this "
                             "layer's input is (N, features)")
        return norms.InstanceNorm(scale_init=scale_init, name=name)
    return norms.GroupNorm(num_groups=num_groups, scale_init=scale_init, name=name)


def _spatial_dims(x: jax.Array, owner: str) -> int:
    """1 for signals ``(N, L, C)``, 2 for images ``(N, H, W, C)``; anything else raises."""
    if x.ndim not in (3, 4):
        raise ValueError(f"{owner}: expected images (N, H, W, C) or signals (N, L, C), got shape {x.shape}")
    return x.ndim - 2


class Conv(nn.Module):
    """A stride-1, SAME-padded convolution computed as patches @ kernel (im2col); drop-in for ``nn.Conv``.

    Same parameters (``kernel`` of shape ``(*window, in, out)`` with ``nn.Conv``'s LeCun-normal
    initialization, optional zero ``bias``) and the same output as ``nn.Conv(features, window,
    padding="SAME")`` for an odd window, on signals ``(N, L, C)`` or images ``(N, H, W, C)``. Why not
    ``nn.Conv``: the experiments vmap training over seeds, so every lane has its own kernel, and
    ``jax.vmap`` turns a convolution with a batched kernel into a grouped convolution, whose gradient
    XLA:CPU computes orders of magnitude slower than the batched matrix product this layer becomes
    (measured in docs/mnist1d.md).

    Attributes:
      features: output channels.
      kernel_size: taps per spatial axis (odd).
      use_bias: add a learned bias.
    """

    features: int
    kernel_size: int = 3
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dims = _spatial_dims(x, "Conv")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"Conv: kernel_size must be a positive odd int, got {self.kernel_size!r}")
        window = (self.kernel_size,) * dims
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (*window, x.shape[-1], self.features))
        half = self.kernel_size // 2
        padded = jnp.pad(x, [(0, 0)] + [(half, half)] * dims + [(0, 0)])
        # Patch channels ordered (offset along each axis..., input channel): the kernel's row-major order.
        offsets = itertools.product(range(self.kernel_size), repeat=dims)
        spatial = x.shape[1:-1]
        patches = jnp.concatenate(
            [padded[(slice(None), *(slice(o, o + n) for o, n in zip(offset, spatial, strict=True)))]
             for offset in offsets], axis=-1)
        y = patches @ kernel.reshape(-1, self.features)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


class CNN(nn.Module):
    """Conv -> norm -> ReLU blocks with 2x pooling after some of them, global average pooling, Dense.

    Works on images ``(N, H, W, C)`` (3x3 convolutions, 2x2 pools) and on signals ``(N, L, C)`` (3-tap
    convolutions, pools of 2) with the same parameters per block.

    Attributes:
      norm: one of :data:`NORMS`.
      num_classes: outputs.
      widths: channels of each conv block; every width must be divisible by ``num_groups`` for group norm.
      pool_after: indices of the blocks followed by an average pool of 2 (stride 2) per spatial axis.
      num_groups: groups of group norm.
      kernel_size: taps per spatial axis.
    """

    norm: str = "batch"
    num_classes: int = 10
    # Two blocks at full resolution, then two at half: more capacity before pooling than the old
    # (16, 32, 32); every width divisible by 1, 2, 4, 8 and 16 (group-count sweeps).
    widths: Sequence[int] = (16, 16, 32, 32)
    pool_after: Sequence[int] = (1,)
    num_groups: int = 8
    kernel_size: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        _check_norm(self.norm, "CNN")
        dims = _spatial_dims(x, "CNN")
        for i, width in enumerate(self.widths):
            if self.norm == "group" and width % self.num_groups:
                raise ValueError(f"CNN: group norm needs every width divisible by num_groups="
                                 f"{self.num_groups}, got width {width} in block {i}")
            # A norm's shift makes a conv bias redundant; without a norm the conv keeps its bias.
            x = Conv(width, self.kernel_size, use_bias=self.norm == "none", name=f"conv{i}")(x)
            x = make_norm(self.norm, train=train, num_groups=self.num_groups, spatial_dims=dims,
                          name=f"norm{i}")(x)
            x = nn.relu(x)
            if i in self.pool_after:
                x = nn.avg_pool(x, (2,) * dims, strides=(2,) * dims)
        x = jnp.mean(x, axis=tuple(range(1, 1 + dims)))
        return nn.Dense(self.num_classes, name="head")(x)


class ResidualCNN(nn.Module):
    """A stem convolution, ``blocks`` normalized residual blocks at one width, global average pooling, Dense.

    The Group Norm paper's setting (Wu & He 2018 train ResNet-50: about 50 normalized layers) scaled down,
    to test how depth changes a norm's behaviour: ``1 + 2 * blocks`` normalized convolutions, so
    ``blocks=16`` has 33 and ``blocks=32`` 65. The blocks are *post-activation* basic blocks of the original
    ResNet (He et al. 2016, CVPR; the Group Norm paper's ResNet-50 is one), every convolution followed by
    the norm::

        stem:  x = relu(norm(conv(x)))
        block: x = relu(x + norm2(conv2(relu(norm1(conv1(x))))))

    Each block's last norm starts with a zero scale (``zero_init_residual``; Goyal et al. 2017, "Accurate,
    Large Minibatch SGD", §5.1, as the Group Norm paper does): every block starts as the identity, so a deep
    stack trains from the first step like a shallow one. Convolutions are same-padded and stride 1
    (:class:`Conv`), so the resolution never changes: 3x3 on images ``(N, H, W, C)``, 3 taps on signals
    ``(N, L, C)``.

    The blocks are one ``nn.scan`` over a block with stacked parameters (every leaf of ``params["blocks"]``
    and, for batch norm, ``batch_stats["blocks"]`` has a leading axis of ``blocks``): the compiled program,
    and its compile time, do not grow with depth.

    Attributes:
      norm: ``batch``, ``layer``, ``instance`` or ``group`` (not ``none``: the zero-initialized residual
        branch is a norm's scale).
      blocks: residual blocks (>= 1).
      width: channels of the stem and of every block; divisible by ``num_groups`` for group norm.
      num_classes: outputs.
      num_groups: groups of group norm.
      kernel_size: taps per spatial axis.
      zero_init_residual: start each block's last norm scale at zero (else at one).

    >>> import jax, jax.numpy as jnp
    >>> model = ResidualCNN(norm="group", blocks=4, width=8, num_groups=4)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((2, 40, 1)))
    >>> model.apply(variables, jnp.zeros((2, 40, 1))).shape
    (2, 10)
    >>> variables["params"]["blocks"]["conv1"]["kernel"].shape   # (blocks, taps, in, out)
    (4, 3, 8, 8)
    """

    norm: str = "batch"
    blocks: int = 2
    width: int = 16
    num_classes: int = 10
    num_groups: int = 8
    kernel_size: int = 3
    zero_init_residual: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        _check_norm(self.norm, "ResidualCNN", RESIDUAL_NORMS)
        dims = _spatial_dims(x, "ResidualCNN")
        if isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 1:
            raise ValueError(f"ResidualCNN: blocks must be an int >= 1, got {self.blocks!r}")
        if self.norm == "group" and self.width % self.num_groups:
            raise ValueError(f"ResidualCNN: group norm needs width divisible by num_groups={self.num_groups}, "
                             f"got width {self.width}")
        # A norm's shift makes a conv bias redundant.
        x = Conv(self.width, self.kernel_size, use_bias=False, name="stem")(x)
        x = nn.relu(make_norm(self.norm, train=train, num_groups=self.num_groups, spatial_dims=dims,
                              name="stem_norm")(x))
        stack = nn.scan(_ResidualBlock, variable_axes={"params": 0, "batch_stats": 0},
                        split_rngs={"params": True}, length=self.blocks)
        x, _ = stack(self.norm, self.kernel_size, self.num_groups, self.zero_init_residual, train,
                     name="blocks")(x, None)
        x = jnp.mean(x, axis=tuple(range(1, 1 + dims)))
        return nn.Dense(self.num_classes, name="head")(x)


class _ResidualBlock(nn.Module):
    """``relu(x + norm2(conv2(relu(norm1(conv1(x))))))`` at the input's width (:class:`ResidualCNN`), in
    ``nn.scan``'s ``(carry, x) -> (carry, y)`` form."""

    norm: str
    kernel_size: int
    num_groups: int
    zero_init_residual: bool
    train: bool

    @nn.compact
    def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
        norm = functools.partial(make_norm, self.norm, train=self.train, num_groups=self.num_groups,
                                 spatial_dims=x.ndim - 2)
        width = x.shape[-1]
        y = Conv(width, self.kernel_size, use_bias=False, name="conv1")(x)
        y = nn.relu(norm(name="norm1")(y))
        y = Conv(width, self.kernel_size, use_bias=False, name="conv2")(y)
        last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        return nn.relu(x + norm(scale_init=last_scale, name="norm2")(y)), None


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
            x = make_norm(self.norm, train=train, num_groups=self.num_groups, spatial_dims=0,
                          name=f"norm{i}")(x)
            x = nn.relu(x)
        return nn.Dense(self.num_classes, name="head")(x)


class GRU(nn.Module):
    """A (bidirectional) GRU over the sequence, every step's output flattened into a linear classifier.

    The MNIST-1D paper's recurrent baseline (Greydanus & Kobak: a bidirectional GRU of 6 units per
    direction whose 40 steps x 12 outputs feed one linear layer). A signal ``(N, L, C)`` is ``L`` steps of
    ``C`` features, an image ``(N, H, W, C)`` ``H`` steps of ``W * C``. Flax's ``nn.GRUCell`` scanned by
    ``nn.RNN`` (a ``lax.scan``; the backward direction reads the sequence reversed). No normalization.

    Attributes:
      num_classes: outputs.
      hidden: units per direction.
      bidirectional: also run a GRU from the end of the sequence and concatenate the two outputs.
    """

    num_classes: int = 10
    hidden: int = 6
    bidirectional: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no state that differs between training and evaluation
        _spatial_dims(x, "GRU")
        steps = x.reshape(x.shape[0], x.shape[1], -1)
        forward = nn.RNN(nn.GRUCell(self.hidden, name="forward"))
        if self.bidirectional:
            rnn: nn.Module = nn.Bidirectional(forward, nn.RNN(nn.GRUCell(self.hidden, name="backward")))
        else:
            rnn = forward
        outputs = rnn(steps)  # (N, steps, hidden x directions)
        return nn.Dense(self.num_classes, name="head")(outputs.reshape(x.shape[0], -1))


RNN_NORMS: tuple[str, ...] = ("none", "batch", "layer")
"""The norms a recurrent cell takes: instance and group norm have no spatial axis to reduce inside a step."""


def _stacked(init: Callable[..., jax.Array], blocks: int) -> Callable[..., jax.Array]:
    """An initializer that draws ``blocks`` kernels of ``shape[-1] // blocks`` columns with ``init`` and
    concatenates them: one orthogonal matrix per gate, as ``nn.GRUCell`` draws its recurrent kernels."""
    def stacked(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        *rest, columns = shape
        keys = jax.random.split(key, blocks)
        return jnp.concatenate([init(k, (*rest, columns // blocks), dtype) for k in keys], axis=-1)

    return stacked


class NormGRUCell(nn.Module):
    """One step of a GRU whose input and recurrent pre-activations are normalized separately.

    With ``W_x x`` and ``W_h h`` each ``3 * hidden`` wide (reset, update and candidate gates side by side)::

        a = norm_x(W_x x),  b = norm_h(W_h h)           # two norms, each with its own scale and shift
        r = sigmoid(a_r + b_r),  z = sigmoid(a_z + b_z)
        n = tanh(a_n + r * b_n),  h' = (1 - z) * n + z * h

    ``norm="none"`` is ``flax.linen.GRUCell`` exactly (the norms' shifts are its biases; tested); ``"layer"``
    is Ba, Kiros & Hinton's (2016) layer-normalized recurrence, one mean and variance per example and step
    over each projection's ``3 * hidden`` features; ``"batch"`` is Cooijmans et al.'s (2016) recurrent
    batch norm when the cell is scanned with one set of ``batch_stats`` per step (:class:`NormGRU` does):
    statistics per feature over the batch, separate for every time step. The norms are
    :func:`make_norm`'s. Call ``cell(h, x) -> (h', h')`` (a ``flax.linen.scan`` body).

    ``normalize_input=None`` normalizes ``W_x x`` unless a step has a single input feature: then ``W_x x``
    is rank one (``x`` times a fixed vector), and layer norm over its features keeps only the sign of
    ``x`` (measured: a layer-norm GRU reading MNIST-1D's 40 single samples reached 18-20 % test accuracy
    with its input normalized, 93.5 % without). ``W_x x`` then gets a bias instead, whatever the norm.

    Attributes:
      hidden: units.
      norm: one of :data:`RNN_NORMS`.
      train: batch norm uses the batch's statistics (and updates ``batch_stats``) when ``True``.
      normalize_input: normalize ``W_x x`` too (``None``: when a step has more than one feature).
    """

    hidden: int
    norm: str = "none"
    train: bool = False
    normalize_input: bool | None = None

    @nn.compact
    def __call__(self, h: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        _check_norm(self.norm, "NormGRUCell", RNN_NORMS)
        normalize_input = x.shape[-1] > 1 if self.normalize_input is None else self.normalize_input
        plain = self.norm == "none"  # a norm's shift is the bias
        a = nn.Dense(3 * self.hidden, use_bias=plain or not normalize_input, name="input")(x)
        b = nn.Dense(3 * self.hidden, use_bias=plain, kernel_init=_stacked(nn.initializers.orthogonal(), 3),
                     name="recurrent")(h)
        if normalize_input:
            a = make_norm(self.norm, train=self.train, spatial_dims=0, name="input_norm")(a)
        b = make_norm(self.norm, train=self.train, spatial_dims=0, name="recurrent_norm")(b)
        a_r, a_z, a_n = jnp.split(a, 3, axis=-1)
        b_r, b_z, b_n = jnp.split(b, 3, axis=-1)
        r, z = nn.sigmoid(a_r + b_r), nn.sigmoid(a_z + b_z)
        h = (1.0 - z) * jnp.tanh(a_n + r * b_n) + z * h
        return h, h


class NormGRU(nn.Module):
    """A GRU of :class:`NormGRUCell` over the sequence (a ``flax.linen.scan``), classifying from the last state.

    A signal ``(N, L, C)`` is ``L`` steps of ``C`` features, an image ``(N, H, W, C)`` ``H`` steps of
    ``W * C``. The parameters are shared by every step; batch norm's statistics are not: ``batch_stats``
    has a leading axis of one entry per step (Cooijmans et al. 2016), because the hidden state starts at
    zero and its pre-activations' distribution moves over the first steps, so one running average shared
    by the steps would normalize each step at inference with statistics of a different distribution than
    it was trained with.

    Attributes:
      norm: one of :data:`RNN_NORMS`.
      num_classes: outputs.
      hidden: units.
      normalize_input: see :class:`NormGRUCell`.
    """

    norm: str = "layer"
    num_classes: int = 10
    hidden: int = 64
    normalize_input: bool | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        _check_norm(self.norm, "NormGRU", RNN_NORMS)
        _spatial_dims(x, "NormGRU")
        steps = x.reshape(x.shape[0], x.shape[1], -1)
        scan = nn.scan(NormGRUCell, variable_broadcast="params", split_rngs={"params": False},
                       variable_axes={"batch_stats": 0}, in_axes=1, out_axes=1)
        cell = scan(self.hidden, self.norm, train, self.normalize_input, name="cell")
        h, _ = cell(jnp.zeros((x.shape[0], self.hidden), steps.dtype), steps)
        return nn.Dense(self.num_classes, name="head")(h)
