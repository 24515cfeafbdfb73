"""The held-out loss (--validation_split): a periodic action of the loop, as the validation images are.

    held_out = HeldOutLoss.for_run(built, loader, seed)    # None without --validation_split; compiles ahead
    val_loss = held_out(state.params, frozen)              # a host float

Which images are held out, and the fixed batches they come in: t2i_flax/data/held_out.py. The loss is the mean over
the held-out images of each one's diffusion loss averaged over NUM_TIMESTEPS fixed timesteps, spread evenly over the
schedule (kohya's sd-scripts measure its validation loss at 5 fixed timesteps too), with noise drawn from a key fixed
by the seed (not the step's), so every measurement of a run, and of a resumed run, is of the same samples, timesteps
and noise: the curve moves only with the weights. The math is the training step's (step.held_out_losses): the plain
objective, no gradients.

It measures the raw trained weights (state.params), not the EMA: the curve follows what the optimizer does, step for
step (the EMA, which --use_ema exports and draws the validation images from, lags them). The program runs on the
training mesh and takes the state's parameters and the frozen inputs with their own shardings (no second copy of the
weights), one compiled program per image size of the held-out batches. Each batch is a weighted sum over its samples
(the padding weighs 0) reduced over the whole mesh; the host adds the batches' sums in float64, so every host gets the
same number, the one a single process gets.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from t2i_flax import sharding, step
from t2i_flax.metrics import log

HELD_OUT_STREAM = 0x56414C  # "VAL": the held-out noise's key, folded from the seed's, apart from the step keys
NUM_TIMESTEPS = 5


def fixed_timesteps(num_train_timesteps: int, count: int = NUM_TIMESTEPS) -> np.ndarray:
    """`count` timesteps at the middles of equal parts of the schedule: 100, 300, 500, 700, 900 of 1000 (the last,
    pure noise with zero terminal SNR, is left out)."""
    return ((np.arange(count) + 0.5) * num_train_timesteps / count).astype(np.int32)


def fixed_key(seed: int) -> np.ndarray:
    """The held-out noise's key (uint32[2]), a constant of the program."""
    return np.asarray(jax.random.fold_in(jax.random.PRNGKey(seed), HELD_OUT_STREAM))


def weighted_loss_sums(config: step.StepConfig, params, frozen: dict, batch: dict, key, timesteps_K) -> dict:
    """{"loss": sum of weight x the sample's loss, "weight": sum of the weights} of one held-out batch."""
    losses = step.held_out_losses(config, params, frozen, batch, key, timesteps_K)
    weights = batch["weight"].astype(jnp.float32)
    return {"loss": jnp.sum(losses * weights), "weight": jnp.sum(weights)}


def abstract_held_out_batch(built, size: tuple[int, int]) -> dict:
    """A held-out global batch's ShapeDtypeStructs: the training batch at `size`, its samples' indices and weights."""
    where = sharding.batch_sharding(built.mesh)
    per_sample = lambda dtype: jax.ShapeDtypeStruct((built.plan.global_batch_size,), dtype, sharding=where)  # noqa: E731
    return dict(built.batch_at(size), held_out_index=per_sample(jnp.int32), weight=per_sample(jnp.float32))


class HeldOutLoss:
    def __init__(self, built, held_out, example_at, seed: int):
        """`built`: the run's setup.TrainSetup; `held_out`: its data/held_out.py HeldOutSet; `example_at`: the
        loader's example function (online, or over the latent cache) that makes each sample."""
        self.mesh, self.held_out, self.example_at = built.mesh, held_out, example_at
        self.batches = held_out.batches()
        step_config = built.step_config
        key, timesteps_K = fixed_key(seed), fixed_timesteps(step_config.noise_schedule.num_train_timesteps)
        program = jax.jit(lambda params, frozen, batch: weighted_loss_sums(step_config, params, frozen, batch, key,
                                                                          timesteps_K),
                          in_shardings=(built.state_sharding.params, built.frozen_sharding,
                                        sharding.batch_sharding(built.mesh)),
                          out_shardings=sharding.replicated(built.mesh))
        self.programs = {size: program.lower(built.state.params, built.frozen,
                                             abstract_held_out_batch(built, size)).compile()
                         for size in sorted({batch.size for batch in self.batches})}

    @classmethod
    def for_run(cls, built, loader, seed: int) -> "HeldOutLoss | None":
        """The run's held-out loss, compiled now and announced; None without --validation_split."""
        if loader.held_out is None:
            return None
        start = time.perf_counter()
        held_out = cls(built, loader.held_out, loader.example_fn, seed)
        log(f"held-out loss: {len(held_out)} images in {len(held_out.batches)} batches of "
            f"{built.plan.global_batch_size} at {NUM_TIMESTEPS} timesteps, at every validation and the end "
            f"(compiled in {time.perf_counter() - start:.1f}s)")
        return held_out

    def __len__(self) -> int:
        return len(self.held_out)

    def __call__(self, params, frozen: dict) -> float:
        """The mean loss of the held-out images with `params` (the trained tree, as the state holds it)."""
        sums = []
        for batch in self.batches:
            host = self.held_out.host_batch(batch, self.example_at, jax.process_index(), jax.process_count())
            with jax.transfer_guard_host_to_device("allow"):  # the batch, as the loop's own
                placed = sharding.global_batch(self.mesh, host)
            sums.append(self.programs[batch.size](params, frozen, placed))
        totals = jax.device_get(sums)
        return float(sum(np.float64(s["loss"]) for s in totals) / sum(np.float64(s["weight"]) for s in totals))
