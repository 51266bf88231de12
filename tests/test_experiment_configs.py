"""Contract A: every experiment's QUICK and FULL configs can be built, checked in seconds without training.

Each module that defines ``EXPERIMENT`` also defines ``check_configs()``, which builds every model,
optimizer and data shape of both configs abstractly (``jax.eval_shape``) and raises ``ValueError`` on a
config that cannot run. A FULL config that crashes after 20 minutes of training fails here instead.
"""

import dataclasses
import importlib

import optax
import pytest

from jaxopt_lab import experiment, models

EXPERIMENTS = experiment.available_experiments()


def _module(name):
    return importlib.import_module(EXPERIMENTS[name].run.__module__)


def test_every_experiment_is_checked():
    assert len(EXPERIMENTS) >= 8, list(EXPERIMENTS)  # the discovery found the experiments


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_quick_and_full_configs_can_run(name):
    module = _module(name)
    assert callable(getattr(module, "check_configs", None)), (
        f"experiments/{module.__name__.rsplit('.', 1)[-1]}.py defines EXPERIMENT but no check_configs()")
    module.check_configs()  # raises ValueError on a config that cannot run


def test_a_group_count_that_does_not_divide_a_width_is_caught():
    # The crash of issue 11: FULL's group counts reached 32 while the first CNN width was 16.
    model = models.CNN(norm="group", widths=(16, 32, 32), num_groups=32)
    with pytest.raises(ValueError, match=r"FULL: GN G=32.*divisible by num_groups=32"):
        experiment.check_training_config(model, optax.adam(1e-3), (8, 8, 1), batch_sizes=[32],
                                         train_size=1000, where="FULL: GN G=32")


def test_the_normalization_check_rejects_the_old_full_config():
    normalization = _module("normalization")
    broken = dataclasses.replace(normalization.FULL, group_counts=(*normalization.FULL.group_counts, 64))
    with pytest.raises(ValueError, match="64"):
        normalization.check_config(broken, "FULL")
