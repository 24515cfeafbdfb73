"""--timestep_bias_*: which training timesteps are drawn more (or less) often, as diffusers'
train_text_to_image_sdxl.py weights them. The step draws its timesteps from these weights (categorical) instead of
uniformly; with the strategy `none` (the default) nothing changes.

The weights over t in [0, T): 1 everywhere, x `multiplier` on the biased timesteps, then divided by their sum:
  earlier  the first int(portion x T) timesteps (the least noisy: fine detail)
  later    the last int(portion x T) (the noisiest: composition); a portion that rounds to 0 biases none
  range    [begin, end), end excluded (as the script's slice, though its help says inclusive)"""
from __future__ import annotations

import dataclasses

import numpy as np

from t2i_flax.errors import FlagError


@dataclasses.dataclass(frozen=True)
class TimestepBias:
    strategy: str
    multiplier: float = 1.0
    begin: int = 0
    end: int = 1000
    portion: float = 0.25

    @classmethod
    def from_config(cls, train) -> "TimestepBias | None":
        """From a TrainConfig's --timestep_bias_* fields; None for the strategy `none` (uniform timesteps)."""
        if train.timestep_bias_strategy == "none":
            return None
        return cls(train.timestep_bias_strategy, train.timestep_bias_multiplier, train.timestep_bias_begin,
                   train.timestep_bias_end, train.timestep_bias_portion)

    def check(self, num_train_timesteps: int) -> None:
        """FlagError (one line) when the range does not fit the model's schedule."""
        if self.strategy == "range" and self.end > num_train_timesteps:
            raise FlagError(f"--timestep_bias_end {self.end} is past this model's {num_train_timesteps} training "
                            f"timesteps (its scheduler's num_train_timesteps)")

    def biased(self, num_train_timesteps: int) -> tuple[int, int]:
        """[first, stop) of the timesteps the multiplier applies to."""
        count = int(self.portion * num_train_timesteps)
        if self.strategy == "earlier":
            return 0, count
        if self.strategy == "later":
            return num_train_timesteps - count, num_train_timesteps
        return self.begin, self.end

    def weights(self, num_train_timesteps: int) -> np.ndarray:
        """float32 (T,) probabilities, summing to 1."""
        self.check(num_train_timesteps)
        first, stop = self.biased(num_train_timesteps)
        weights = np.ones(num_train_timesteps, np.float32)
        weights[first:stop] *= np.float32(self.multiplier)
        return weights / weights.sum(dtype=np.float32)

    def describe(self) -> str:
        """The model card's words."""
        where = f"timesteps [{self.begin}, {self.end})" if self.strategy == "range" else \
            f"the {self.strategy} {self.portion:g} of the timesteps"
        return f"{self.strategy}: x{self.multiplier:g} on {where}"
