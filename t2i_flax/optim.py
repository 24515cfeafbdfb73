"""Optimizer: clip_by_global_norm then `--optimizer` (AdamW by default, or optax's Adafactor, Lion or Prodigy), with
the learning rate schedules diffusers names (`--lr_scheduler`), evaluated at the 0-based update count as torch's
LambdaLR does (so with warmup the first update uses lr 0, as in the PyTorch script).

Weight decay applies to every parameter by default, as torch's AdamW in the PyTorch script and
optax.adamw in the Flax script do; `decay_mask=True` exempts biases and norm scales.

The optimizers and the flags they read (everything else is optax's default):
  adamw      optax.adamw: --adam_beta1/2, --adam_epsilon, --adam_weight_decay (decoupled, x lr), the decay mask
  adafactor  optax.adafactor: factored second moments (tensors whose two largest sides are >= 128), decay rate 0.8,
             update clipping at RMS 1, steps relative to the parameters' RMS (at least 1e-3), no momentum, no weight
             decay: transformers' Adafactor(scale_parameter=True, relative_step=False) with an explicit lr
  lion       optax.lion: betas 0.9/0.99 (the paper's), --adam_weight_decay (decoupled, x lr), the decay mask
  prodigy    optax.contrib.prodigy: --adam_beta1/2, --adam_epsilon, --adam_weight_decay (no mask); --learning_rate
             scales its estimated step size (1.0 is prodigy's own); with a warmup (the first lr is 0) it runs with
             safeguard_warmup, as prodigy's authors advise, since its estimate is 0/0 otherwise"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adafactor", "lion", "prodigy")
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
POLYNOMIAL_END_LR = 1e-7


def lr_multiplier(name: str, step, warmup_steps: int, total_steps: int, base_lr: float):
    """The factor diffusers' get_scheduler(name) applies at update `step` (jnp scalar or int)."""
    step = jnp.asarray(step, jnp.float32)
    warmup = step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if name == "constant":
        return jnp.ones_like(step)
    if name == "constant_with_warmup":
        after = jnp.ones_like(step)
    elif name == "linear":
        after = jnp.maximum(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    elif name == "cosine":  # half a cosine wave, down to 0 at total_steps
        after = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * 0.5 * 2.0 * progress)))
    elif name == "cosine_with_restarts":  # one cycle by default
        after = jnp.where(progress >= 1.0, 0.0, jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * (progress % 1.0)))))
    elif name == "polynomial":  # power 1, to POLYNOMIAL_END_LR
        remaining = 1.0 - (step - warmup_steps) / max(1, total_steps - warmup_steps)
        decayed = ((base_lr - POLYNOMIAL_END_LR) * remaining + POLYNOMIAL_END_LR) / base_lr
        after = jnp.where(step > total_steps, POLYNOMIAL_END_LR / base_lr, decayed)
    else:
        raise ValueError(f"--lr_scheduler {name!r} is not one of {', '.join(SCHEDULES)}")
    return jnp.where(step < warmup_steps, warmup, after)


def learning_rate_schedule(name: str, base_lr: float, warmup_steps: int, total_steps: int):
    if name == "polynomial" and not base_lr > POLYNOMIAL_END_LR:
        raise ValueError(f"--lr_scheduler polynomial decays to {POLYNOMIAL_END_LR}: --learning_rate must be larger")
    lr_multiplier(name, 0, warmup_steps, total_steps, base_lr)  # validates the name
    return lambda count: base_lr * lr_multiplier(name, count, warmup_steps, total_steps, base_lr)


def weight_decay_mask(params):
    """True where AdamW decays: kernels and embeddings, not biases or norm scales."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) not in ("bias", "scale"),
                                            params)


def make_optimizer(schedule, beta1=0.9, beta2=0.999, weight_decay=1e-2, epsilon=1e-8, max_grad_norm=1.0,
                   decay_mask: bool = False, name: str = "adamw", warmup: bool = False):
    """clip_by_global_norm(max_grad_norm), then the optimizer `name` (see the module's docstring for what each reads).
    `warmup`: the schedule's first lr is 0 (prodigy then safeguards its estimate)."""
    mask = weight_decay_mask if decay_mask else None
    if name == "adamw":
        update = optax.adamw(schedule, b1=beta1, b2=beta2, eps=epsilon, weight_decay=weight_decay, mask=mask)
    elif name == "adafactor":
        update = optax.adafactor(schedule)
    elif name == "lion":
        update = optax.lion(schedule, weight_decay=weight_decay, mask=mask)
    elif name == "prodigy":
        update = optax.contrib.prodigy(schedule, betas=(beta1, beta2), eps=epsilon, weight_decay=weight_decay,
                                       safeguard_warmup=warmup)
    else:
        raise ValueError(f"--optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), update)
