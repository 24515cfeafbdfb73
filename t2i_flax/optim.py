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

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

OPTIMIZERS = ("adamw", "adafactor", "lion", "prodigy")
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
POLYNOMIAL_END_LR = 1e-7


def _after_warmup(name: str, step, warmup_steps, total_steps, base_lr):
    """Schedule `name`'s factor after its warmup at update `step` (float32); the numbers may be Python or traced."""
    span = jnp.maximum(1.0, jnp.asarray(total_steps - warmup_steps, jnp.float32))
    if name in ("constant", "constant_with_warmup"):
        return jnp.ones_like(step)
    if name == "linear":
        return jnp.maximum(0.0, (total_steps - step) / span)
    progress = (step - warmup_steps) / span
    if name == "cosine":  # half a cosine wave, down to 0 at total_steps
        return jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * 0.5 * 2.0 * progress)))
    if name == "cosine_with_restarts":  # one cycle by default
        return jnp.where(progress >= 1.0, 0.0, jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * (progress % 1.0)))))
    if name == "polynomial":  # power 1, to POLYNOMIAL_END_LR
        remaining = 1.0 - (step - warmup_steps) / span
        decayed = ((base_lr - POLYNOMIAL_END_LR) * remaining + POLYNOMIAL_END_LR) / base_lr
        return jnp.where(step > total_steps, POLYNOMIAL_END_LR / base_lr, decayed)
    raise ValueError(f"--lr_scheduler {name!r} is not one of {', '.join(SCHEDULES)}")


def lr_multiplier(name, step, warmup_steps, total_steps, base_lr):
    """The factor diffusers' get_scheduler(name) applies at update `step` (jnp scalar or int). `name` is a schedule's
    name, or its index in SCHEDULES as a (traced) integer with traced numbers: the program then holds every schedule
    and picks one."""
    step = jnp.asarray(step, jnp.float32)
    if isinstance(name, str):
        after = _after_warmup(name, step, warmup_steps, total_steps, base_lr)
        if name == "constant":
            return after
        return jnp.where(step < warmup_steps, step / max(1, warmup_steps), after)
    after = jnp.select([name == index for index in range(len(SCHEDULES))],
                       [_after_warmup(schedule, step, warmup_steps, total_steps, base_lr) for schedule in SCHEDULES])
    warmup = step / jnp.maximum(1.0, warmup_steps)
    return jnp.where(jnp.logical_and(step < warmup_steps, name != SCHEDULES.index("constant")), warmup, after)


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


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """The run's optimizer and EMA: its kind and its numbers. The numbers that runs commonly change (the learning rate,
    its schedule, warmup and length, Adam's epsilon, the weight decay, the clipping norm, the EMA decay) reach the
    compiled step as arrays (the step's frozen["hyperparameters"], `arrays()`), not as constants compiled into it: runs
    that differ only in them (a learning-rate sweep, a resume that trains longer) run one program, which the
    compilation cache gives back instead of compiling it again (minutes for SDXL on a TPU). The optimizer's kind, the
    decay mask, Adam's betas (optax derives 1 - beta from them, exactly only from a Python float) and Prodigy's and
    Adafactor's own numbers stay constants of the program."""
    name: str = "adamw"
    schedule: str = "constant"
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    total_steps: int = 1
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    decay_mask: bool = False
    warmup: bool = False          # the first lr is 0 (prodigy then safeguards its estimate)
    ema_decay: float = 0.9999

    RUNTIME: ClassVar[tuple] = ("schedule", "learning_rate", "warmup_steps", "total_steps", "epsilon", "weight_decay",
                                "max_grad_norm", "ema_decay")

    def __post_init__(self):
        self.learning_rate_schedule()  # ValueError for a schedule it cannot build
        if self.name not in OPTIMIZERS:
            raise ValueError(f"--optimizer {self.name!r} is not one of {', '.join(OPTIMIZERS)}")

    def arrays(self) -> dict:
        """The step's input: each runtime number as a float32 scalar (the schedule as its index in SCHEDULES)."""
        return {name: np.int32(SCHEDULES.index(self.schedule)) if name == "schedule" else np.float32(getattr(self, name))
                for name in self.RUNTIME}

    def abstract(self) -> dict:
        return {name: jax.ShapeDtypeStruct((), value.dtype) for name, value in self.arrays().items()}

    def learning_rate_schedule(self, values: dict | None = None):
        """update count -> lr: from the step's arrays `values`, or (None) from this object's numbers as constants."""
        if values is None:
            return learning_rate_schedule(self.schedule, self.learning_rate, self.warmup_steps, self.total_steps)
        return lambda count: values["learning_rate"] * lr_multiplier(
            values["schedule"], count, values["warmup_steps"], values["total_steps"], values["learning_rate"])

    def optimizer(self, values: dict | None = None) -> optax.GradientTransformation:
        """The optimizer chain (make_optimizer) reading `values` (the step's arrays), or this object's constants."""
        if values is None or self.name == "prodigy":  # prodigy's own numbers stay constants; its lr is scheduled
            numbers = {"epsilon": self.epsilon, "weight_decay": self.weight_decay, "max_grad_norm": self.max_grad_norm}
        else:
            numbers = {name: values[name] for name in ("epsilon", "weight_decay", "max_grad_norm")}
        return make_optimizer(self.learning_rate_schedule(values), self.beta1, self.beta2, numbers["weight_decay"],
                              numbers["epsilon"], numbers["max_grad_norm"], self.decay_mask, self.name, self.warmup)

    def ema_decay_value(self, values: dict | None = None):
        return self.ema_decay if values is None else values["ema_decay"]
