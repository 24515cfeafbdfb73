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


@pytest.mark.parametrize("decay_mask", [False, True])
def test_weight_decay_applies_to_every_parameter_unless_masked(decay_mask):
    params = {"conv": {"kernel": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32)},
              "norm": {"scale": np.ones(2, np.float32), "bias": np.ones(2, np.float32)}}
    optimizer = optim.make_optimizer(lambda _: 0.1, weight_decay=0.5, decay_mask=decay_mask)
    state = optimizer.init(params)
    zero_grads = {k: {n: np.zeros_like(v) for n, v in d.items()} for k, d in params.items()}
    updates, _ = optimizer.update(zero_grads, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["conv"]["kernel"], 1 - 0.1 * 0.5)  # always decayed
    for value in (new["conv"]["bias"], new["norm"]["scale"], new["norm"]["bias"]):
        np.testing.assert_allclose(value, 1.0 if decay_mask else 1 - 0.1 * 0.5)


def test_optimizer_equals_torch_clip_grad_norm_and_adamw():
    """Five updates of random gradients (clipped on some steps, not on others) with a warmup schedule:
    our chain against torch's clip_grad_norm_ + AdamW + LambdaLR, as the PyTorch script steps them."""
    rng = np.random.default_rng(0)
    shapes = {"kernel": (3, 4), "bias": (4,)}
    params = {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}
    grads = [{name: (scale * rng.normal(size=shape)).astype(np.float32) for name, shape in shapes.items()}
             for scale in (0.1, 3.0, 0.01, 1.0, 5.0)]
    lr, warmup, total, max_norm = 1e-2, 2, 5, 1.0
    torch_params = {name: torch.nn.Parameter(torch.tensor(value)) for name, value in params.items()}
    torch_optimizer = torch.optim.AdamW(list(torch_params.values()), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                        weight_decay=1e-2)
    torch_schedule = get_scheduler("linear", torch_optimizer, num_warmup_steps=warmup, num_training_steps=total)
    optimizer = optim.make_optimizer(optim.learning_rate_schedule("linear", lr, warmup, total),
                                     max_grad_norm=max_norm)
    state = optimizer.init(params)
    for grad in grads:
        for name, parameter in torch_params.items():
            parameter.grad = torch.tensor(grad[name])
        torch.nn.utils.clip_grad_norm_(list(torch_params.values()), max_norm)
        torch_optimizer.step()
        torch_schedule.step()
        updates, state = optimizer.update(grad, state, params)
        params = optax.apply_updates(params, updates)
        for name, parameter in torch_params.items():
            # two orderings of the same float32 arithmetic on parameters of magnitude <= 2.5: measured
            # <= 3.0e-7 absolute (a few ulps; torch's clip also adds 1e-6 to the norm)
            np.testing.assert_allclose(params[name], parameter.detach().numpy(), rtol=0, atol=1e-6)
