"""hand-backprop: the course notes' 2-2-2 ReLU network, hand-derived backprop checked against ``jax.grad``.

Tests claims of the course notes (docs/claims.md). Compares, for every parameter, the hand chain rule with
``jax.grad`` of the total
loss and of each loss term, and sets the course notes' two worked updates (w21, w12) beside them.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxopt_lab.lab import worked_network as net
from jaxopt_lab.lab.experiment import Experiment, RunContext
from jaxopt_lab.lab.plotting import new_figure
from jaxopt_lab.lab.runner import main_for

NAME = "hand-backprop"
LEARNING_RATE = 0.1
# The course notes' hand results (docs/claims.md): which loss term it differentiated, its value, new weight.
SEED_CLAIMS = {"w21": ("E1", 0.5, 0.45), "w12": ("E2", 0.0, -0.5)}
SEED_FORWARD = {"z1": 2.0, "h1": 2.0, "z2": -0.5, "h2": 0.0, "o1": 0.0, "o2": -1.5}


def _as_floats(tree: dict) -> dict[str, float]:
    return {k: float(v) for k, v in tree.items()}


def check_configs() -> None:
    """One fixed configuration (the worked example of the course notes, no quick/full split): its forward
    pass and gradients traced abstractly."""
    jax.eval_shape(net.forward, net.PARAMS, net.INPUTS)
    jax.eval_shape(jax.grad(net.total_loss), net.PARAMS, net.INPUTS, net.TARGETS)


def run(ctx: RunContext) -> None:
    params, inputs, targets = net.PARAMS, net.INPUTS, net.TARGETS
    forward = _as_floats(jax.jit(net.forward)(params, inputs))
    e1, e2 = (float(e) for e in net.loss_terms(params, inputs, targets))
    mse = float(net.mse(params, inputs, targets))
    hand = net.hand_gradients(params, inputs, targets)
    autodiff = {
        "total": jax.grad(net.total_loss)(params, inputs, targets),
        "e1": jax.grad(lambda p: net.loss_terms(p, inputs, targets)[0])(params),
        "e2": jax.grad(lambda p: net.loss_terms(p, inputs, targets)[1])(params),
    }
    hand_f = {k: _as_floats(getattr(hand, k)) for k in autodiff}
    auto_f = {k: _as_floats(v) for k, v in autodiff.items()}
    max_abs_diff = max(abs(hand_f[k][p] - auto_f[k][p]) for k in auto_f for p in net.PARAM_NAMES)
    updated = {k: _as_floats(net.gradient_step(params, autodiff[k], LEARNING_RATE)) for k in autodiff}

    rows = []
    for p, (term, seed_grad, seed_new) in SEED_CLAIMS.items():
        term_key = term.lower()
        rows.append({
            "param": p, "initial": params[p], "seed_term": term, "seed_gradient": seed_grad,
            "seed_updated": seed_new, "term_gradient": auto_f[term_key][p],
            "total_gradient": auto_f["total"][p], "updated_by_term": updated[term_key][p],
            "updated_by_total": updated["total"][p],
            "seed_matches_term": bool(np.isclose(seed_grad, auto_f[term_key][p])),
            "seed_matches_total": bool(np.isclose(seed_grad, auto_f["total"][p])),
        })

    fig, axes = new_figure(1, 1, width=9, height=4)
    ax = axes[0, 0]
    x = np.arange(len(net.PARAM_NAMES))
    for offset, key, label in ((-0.27, "e1", "dE1/dθ"), (0.0, "e2", "dE2/dθ"), (0.27, "total", "dE/dθ")):
        ax.bar(x + offset, [auto_f[key][p] for p in net.PARAM_NAMES], width=0.27,
               label=f"{label} (jax.grad)")
        ax.plot(x + offset, [hand_f[key][p] for p in net.PARAM_NAMES], "k.", markersize=5)
    ax.plot([], [], "k.", label="hand chain rule")
    ax.set_xticks(x, net.PARAM_NAMES)
    ax.axhline(0, color="k", linewidth=0.6)
    ax.set_ylabel("gradient")
    ax.set_title("2-2-2 ReLU net: gradient per loss term (h2 is dead: w12, w22, b2, w41, w42 get 0)")
    ax.legend(ncols=2)
    ctx.save_figure(fig, "gradients.png")

    ctx.set_metrics(
        config={"params": params, "inputs": inputs, "targets": targets, "learning_rate": LEARNING_RATE},
        metrics={"forward": forward, "seed_forward": SEED_FORWARD, "E1": e1, "E2": e2, "mse": mse,
                 "hand_gradients": hand_f, "jax_grad": auto_f, "max_abs_hand_vs_jax": max_abs_diff,
                 "updated_params": updated, "seed_comparison": rows},
    )
    fwd_table = "\n".join(f"| {k} | {SEED_FORWARD[k]:g} | {forward[k]:g} |" for k in SEED_FORWARD)
    cmp_table = "\n".join(
        f"| {r['param']} | {r['initial']:g} | {r['seed_term']}: {r['seed_gradient']:g} → {r['seed_updated']:g}"
        f" | {r['term_gradient']:g} → {r['updated_by_term']:g} | {r['total_gradient']:g} → "
        f"{r['updated_by_total']:g} |" for r in rows)
    w21 = rows[0]
    ctx.set_summary(f"""# hand-backprop — the course notes' 2-2-2 ReLU network

Forward pass (the course notes' hand values beside ours):

| value | seed | ours |
|---|---|---|
{fwd_table}

Losses: E1 = {e1:g}, E2 = {e2:g}, MSE = E1 + E2 = {mse:g} (seed: 0.5, 2, 2.5).

Hand chain rule vs `jax.grad`, all 12 parameters, for E, E1 and E2: max |difference| = {max_abs_diff:.2g}.

One gradient-descent step at learning rate {LEARNING_RATE} (gradient → new weight):

| weight | initial | seed (term it used) | jax.grad of that term | jax.grad of E = E1 + E2 |
|---|---|---|---|---|
{cmp_table}

**Where the course notes and the total loss disagree.** The course notes' w21 derivation follows only the path
through o1, i.e. it differentiates E1 alone: dE1/dw21 = (o1 - t1)·w31·ReLU'(z1)·i2 = 0.5, and our
`jax.grad` of E1 agrees. But w21 also reaches o2 through h1 (w32 = -1), adding dE2/dw21 =
(o2 - t2)·w32·ReLU'(z1)·i2 = {auto_f['e2']['w21']:g}. Training minimizes the total loss, so the
gradient that matters is dE/dw21 = {w21['total_gradient']:g}, and w21 moves to
{w21['updated_by_total']:g}, not {w21['seed_updated']:g} — in the *other* direction. For w12 both views agree:
z2 = -0.5 < 0, so h2 is a dead ReLU, ReLU'(z2) = 0, and no gradient reaches w12, w22 or b2 from either term.

![gradients per parameter and loss term](gradients.png)
""")


EXPERIMENT = Experiment(NAME, "the course notes' worked 2-2-2 ReLU net: hand-derived backprop vs jax.grad, "
                        "one GD step", run, check_configs)

if __name__ == "__main__":
    raise SystemExit(main_for(EXPERIMENT))
