"""Learning-rate schedules against diffusers' get_scheduler (the PyTorch script's), and the decay mask."""
import numpy as np
import optax
import pytest
import torch
from diffusers.optimization import get_scheduler

from t2i_flax import optim


@pytest.mark.parametrize("name", optim.SCHEDULES)
def test_schedule_matches_diffusers(name):
    base_lr, warmup, total = 3e-4, 7, 40
    parameter = torch.nn.Parameter(torch.zeros(1))
    torch_optimizer = torch.optim.SGD([parameter], lr=base_lr)
    torch_schedule = get_scheduler(name, torch_optimizer, num_warmup_steps=warmup, num_training_steps=total)
    expected = []
    for _ in range(total + 3):
        expected.append(torch_optimizer.param_groups[0]["lr"])
        torch_optimizer.step()
        torch_schedule.step()
    ours = optim.learning_rate_schedule(name, base_lr, warmup, total)
    np.testing.assert_allclose([float(ours(step)) for step in range(total + 3)], expected, rtol=1e-5, atol=1e-12)


def test_unknown_schedule_and_polynomial_floor_are_refused():
    with pytest.raises(ValueError, match="'warmup_cosine' is not one of"):
        optim.learning_rate_schedule("warmup_cosine", 1e-4, 0, 10)
    with pytest.raises(ValueError, match="polynomial decays to 1e-07"):
        optim.learning_rate_schedule("polynomial", 0.0, 0, 10)


def test_weight_decay_skips_biases_and_norm_scales():
    params = {"conv": {"kernel": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32)},
              "norm": {"scale": np.ones(2, np.float32), "bias": np.ones(2, np.float32)}}
    optimizer = optim.make_optimizer(lambda _: 0.1, weight_decay=0.5)
    state = optimizer.init(params)
    zero_grads = {k: {n: np.zeros_like(v) for n, v in d.items()} for k, d in params.items()}
    updates, _ = optimizer.update(zero_grads, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["conv"]["kernel"], 1 - 0.1 * 0.5)  # decayed
    for value in (new["conv"]["bias"], new["norm"]["scale"], new["norm"]["bias"]):
        np.testing.assert_array_equal(value, 1.0)  # untouched
