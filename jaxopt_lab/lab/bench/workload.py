"""The training workload the ``accumulation`` and ``gradient-centralization`` groups time: a digits model
of the real-data experiments on a random (batch, 8, 8, 1) batch (timings do not depend on pixel values)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.lab import models, training
from jaxopt_lab.lab.bench.rows import BenchConfig

__all__ = ["DigitsWorkload", "digits_workload"]


@dataclasses.dataclass(frozen=True)
class DigitsWorkload:
    """A batch of ``cfg.effective_batch`` digits images, SGD with momentum, and ``model``'s train state."""

    batch: training.Batch
    momentum_sgd: optax.GradientTransformation
    model: nn.Module
    init_key: jax.Array

    def state_for(self, tx: optax.GradientTransformation) -> Any:
        """A fresh train state of the model under ``tx``."""
        return training.create_train_state(self.model, tx, self.init_key, self.batch.images[:1])

    def params(self) -> Any:
        """The model's initial parameters."""
        return self.state_for(optax.identity()).params

    def loss_fn(self) -> Callable[[Any, training.Batch], jax.Array]:
        """``(params, batch) -> cross-entropy`` of the model in training mode (no mutable state)."""
        apply_fn: Callable[..., Any] = self.model.apply

        def loss(params: Any, batch: training.Batch) -> jax.Array:
            return training.cross_entropy(apply_fn({"params": params}, batch.images, train=True), batch.labels)

        return loss


def digits_workload(cfg: BenchConfig, model: nn.Module | None = None) -> DigitsWorkload:
    """The workload for ``model`` (default: the CNN with batch norm)."""
    ki, kl, kp = jax.random.split(jax.random.key(2), 3)
    images = jax.random.normal(ki, (cfg.effective_batch, 8, 8, 1), jnp.float32)
    labels = jax.random.randint(kl, (cfg.effective_batch,), 0, 10)
    return DigitsWorkload(training.Batch(images, labels), optax.sgd(0.05, momentum=0.9),
                          models.CNN() if model is None else model, kp)
