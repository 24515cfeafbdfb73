"""Training options of issue 18: --input_perturbation, --timestep_bias_*, --tracker_project_name, --optimizer.
Each: its flag and one-line refusals, the resume check, the model card's row, and its math against the reference
(diffusers' PyTorch scripts' formulas, optax's optimizers). The input perturbation's one-step parity with the PyTorch
script is in test_step_vs_torch.py."""
import pytest

from t2i_flax import cli, model_card
from t2i_flax.config import RunConfig, may_change_on_resume
from t2i_flax.errors import FlagError

BASE = {"pretrained_model_name_or_path": "m", "dataset_name": "d"}


def config_of(**flags):
    return RunConfig.from_flags({**BASE, **flags})


def card_of(config):
    """The model card's settings of `config` (the plan's numbers do not matter here)."""
    class Plan:
        max_train_steps, global_batch_size, learning_rate = 10, 8, 1e-4

    class Trained:
        def card_settings(self):
            return {}

    return model_card.settings_table(config, Plan(), Trained())


def assert_checked_on_resume(changed: RunConfig, flags: list[str]):
    """Each flag differs from a default run's checkpoint (one line names it); a checkpoint written before the flags
    existed reads as their defaults."""
    base = config_of()
    differences = changed.resume_differences(base.to_dict())
    for flag in flags:
        assert any(d.startswith(flag + ":") for d in differences), (flag, differences)
    assert changed.resume_differences(changed.to_dict()) == []
    old = base.to_dict()
    for flag in flags:
        for group in old.values():
            group.pop(flag[2:], None)
    assert base.resume_differences(old) == []


# ---- --input_perturbation -------------------------------------------------------------------------------------


def test_input_perturbation_flag_resume_check_and_card():
    args = cli.build_parser().parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "d"])
    assert args.input_perturbation == 0.0
    config = config_of(input_perturbation=0.1)
    assert config.train.input_perturbation == 0.1
    assert_checked_on_resume(config, ["--input_perturbation"])
    assert card_of(config)["input perturbation"] == 0.1
    assert "input perturbation" not in card_of(config_of())
    with pytest.raises(FlagError, match="--input_perturbation must be >= 0"):
        config_of(input_perturbation=-0.1)


# ---- --timestep_bias_* ----------------------------------------------------------------------------------------


def reference_timestep_weights(strategy, multiplier, begin, end, portion, num_timesteps):
    """train_text_to_image_sdxl.py's generate_timestep_weights, in torch as the script computes it."""
    import torch

    weights = torch.ones(num_timesteps)
    num_to_bias = int(portion * num_timesteps)
    if strategy == "later":
        bias_indices = slice(-num_to_bias, None)
    elif strategy == "earlier":
        bias_indices = slice(0, num_to_bias)
    elif strategy == "range":
        assert begin >= 0 and end <= num_timesteps  # the script raises ValueError otherwise
        bias_indices = slice(begin, end)
    else:
        return weights
    weights[bias_indices] *= multiplier
    weights /= weights.sum()
    return weights.numpy()


BIAS_CASES = [("earlier", 3.0, 0, 1000, 0.25, 1000), ("later", 2.0, 0, 1000, 0.5, 1000),
              ("later", 0.5, 0, 1000, 0.3, 1000), ("range", 4.0, 200, 500, 0.25, 1000),
              ("range", 10.0, 0, 1, 0.25, 1000), ("earlier", 2.0, 0, 1000, 0.1, 37),
              ("later", 5.0, 0, 1000, 0.001, 100)]  # the last: the portion rounds to no timestep


@pytest.mark.parametrize("strategy,multiplier,begin,end,portion,num_timesteps", BIAS_CASES)
def test_timestep_weights_equal_the_sdxl_script(strategy, multiplier, begin, end, portion, num_timesteps):
    import numpy as np

    from t2i_flax.diffusion.timestep_bias import TimestepBias

    config = config_of(timestep_bias_strategy=strategy, timestep_bias_multiplier=multiplier,
                       timestep_bias_begin=begin, timestep_bias_end=end, timestep_bias_portion=portion)
    ours = TimestepBias.from_config(config.train).weights(num_timesteps)
    want = reference_timestep_weights(strategy, multiplier, begin, end, portion, num_timesteps)
    assert ours.dtype == np.float32 and ours.shape == (num_timesteps,)
    np.testing.assert_allclose(ours, want, rtol=1e-6, atol=0)  # float32 sums in another order
    assert abs(float(ours.sum()) - 1.0) < 1e-6


def test_no_strategy_is_uniform_and_draws_as_before():
    import jax
    import numpy as np

    from t2i_flax import step
    from t2i_flax.diffusion.timestep_bias import TimestepBias

    assert TimestepBias.from_config(config_of(timestep_bias_multiplier=5.0).train) is None
    key = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(step.draw_timesteps(key, 64, 1000),
                                  jax.random.randint(key, (64,), 0, 1000))


@pytest.mark.parametrize("strategy,multiplier,begin,end,portion", [("later", 3.0, 0, 1000, 0.25),
                                                                    ("range", 0.2, 100, 600, 0.25)])
def test_the_step_draws_its_timesteps_from_the_weights(strategy, multiplier, begin, end, portion):
    """The step's own draw (step_randomness with the option, on many step keys): a chi-square test of the histogram
    of 100,000 timesteps against the weights, per timestep, and the biased share within 3 standard deviations."""
    import jax
    import numpy as np
    from scipy import stats

    from t2i_flax import step
    from t2i_flax.diffusion.noise import NoiseSchedule
    from t2i_flax.diffusion.timestep_bias import TimestepBias

    bias = TimestepBias(strategy, multiplier, begin, end, portion)
    schedule = NoiseSchedule(np.linspace(0.999, 0.01, 1000, dtype=np.float32))
    config = step.StepConfig(unet=None, vae=None, text_encoder=None, noise_schedule=schedule, optimizer=None,
                             learning_rate=None, timestep_bias=bias)
    keys = jax.random.split(jax.random.PRNGKey(0), 5_000)
    draw = jax.jit(jax.vmap(lambda key: step.step_randomness(config, key, (20, 4, 1, 1))["timesteps"]))
    timesteps = np.asarray(draw(keys)).ravel()
    weights = bias.weights(1000).astype(np.float64)
    counts = np.bincount(timesteps, minlength=1000)
    assert counts.sum() == 100_000 and counts.size == 1000
    expected = weights * counts.sum()
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < stats.chi2.ppf(0.999, df=999), chi2
    first, stop = bias.biased(1000)
    share, want = counts[first:stop].sum() / counts.sum(), weights[first:stop].sum()
    assert abs(share - want) < 3 * np.sqrt(want * (1 - want) / counts.sum()), (share, want)
    uniform = np.full(1000, 1e-3) * counts.sum()
    assert ((counts - uniform) ** 2 / uniform).sum() > 10 * stats.chi2.ppf(0.999, df=999)  # visibly not uniform


def test_timestep_bias_flags_resume_check_card_and_refusals():
    args = cli.build_parser().parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "d"])
    assert (args.timestep_bias_strategy, args.timestep_bias_multiplier, args.timestep_bias_begin,
            args.timestep_bias_end, args.timestep_bias_portion) == ("none", 1.0, 0, 1000, 0.25)  # the script's
    config = config_of(timestep_bias_strategy="range", timestep_bias_multiplier=2.0, timestep_bias_begin=200,
                       timestep_bias_end=500, timestep_bias_portion=0.5)
    assert_checked_on_resume(config, ["--timestep_bias_strategy", "--timestep_bias_multiplier",
                                      "--timestep_bias_begin", "--timestep_bias_end", "--timestep_bias_portion"])
    assert card_of(config)["timestep bias"] == "range: x2 on timesteps [200, 500)"
    assert card_of(config_of(timestep_bias_strategy="later", timestep_bias_multiplier=1.5))["timestep bias"] == \
        "later: x1.5 on the later 0.25 of the timesteps"
    assert "timestep bias" not in card_of(config_of())
    for flags, message in [({"timestep_bias_strategy": "middle"}, "--timestep_bias_strategy 'middle' is not one of"),
                           ({"timestep_bias_strategy": "later", "timestep_bias_multiplier": 0.0},
                            "--timestep_bias_multiplier must be positive"),
                           ({"timestep_bias_strategy": "earlier", "timestep_bias_portion": 1.5},
                            "--timestep_bias_portion 1.5 must be between 0 and 1"),
                           ({"timestep_bias_strategy": "range", "timestep_bias_begin": 500, "timestep_bias_end": 500},
                            "must satisfy 0 <= begin < end")]:
        with pytest.raises(FlagError, match=message):
            config_of(**flags)
    from t2i_flax.diffusion.timestep_bias import TimestepBias

    with pytest.raises(FlagError, match="--timestep_bias_end 1000 is past this model's 500 training timesteps"):
        TimestepBias("range", 2.0, 0, 1000).check(500)


# ---- --tracker_project_name -----------------------------------------------------------------------------------


@pytest.mark.parametrize("project", [None, "my-sd-runs"])
def test_tracker_project_name_names_the_wandb_project_and_the_tensorboard_run(tmp_path, monkeypatch, project):
    import glob
    import os
    import sys
    import types

    from t2i_flax.metrics import MetricsWriter

    calls = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(kwargs) or types.SimpleNamespace(log=lambda *a, **k: None,
                                                                              finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    writer = MetricsWriter(str(tmp_path), "logs", "all", 2, run_config={"a": 1}, project_name=project)
    writer.add(1, {"loss": 0.5, "learning_rate": 1e-4})
    writer.flush(1)
    writer.close()
    assert calls == [{"project": project or "t2i_flax", "config": {"a": 1}}]
    events = glob.glob(os.path.join(tmp_path, "logs", "**", "events.out.tfevents.*"), recursive=True)
    assert [os.path.relpath(os.path.dirname(path), tmp_path) for path in events] == \
        [os.path.join("logs", project) if project else "logs"]


def test_tracker_project_name_may_change_on_resume_and_is_on_the_card():
    args = cli.build_parser().parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "d",
                                          "--tracker_project_name", "text2image-fine-tune"])
    assert args.tracker_project_name == "text2image-fine-tune"
    config = config_of(tracker_project_name="text2image-fine-tune")
    assert config.resume_differences(config_of().to_dict()) == []  # a logging setting, as --report_to
    assert "--tracker_project_name" in may_change_on_resume()
    assert card_of(config)["tracker project"] == "text2image-fine-tune"
    assert "tracker project" not in card_of(config_of())
    for bad in ("", "a/b"):
        with pytest.raises(FlagError, match="--tracker_project_name"):
            config_of(tracker_project_name=bad)


# ---- --optimizer ----------------------------------------------------------------------------------------------

OPTIMIZER_LR, OPTIMIZER_WARMUP, OPTIMIZER_TOTAL, OPTIMIZER_CLIP = 1e-2, 1, 6, 1.0
GRADIENT_SCALES = (0.1, 3.0, 0.01, 1.0, 5.0)  # clipped on the 2nd and 5th updates (norms > 1), not on the others


def small_tree(seed=0):
    """A kernel Adafactor factors (both sides >= 128), a conv kernel, a bias and a norm scale."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shapes = {"proj": {"kernel": (128, 130), "bias": (130,)}, "conv": {"kernel": (3, 3, 4, 8)}, "norm": {"scale": (8,)}}
    return {module: {name: (0.5 * rng.standard_normal(shape)).astype(np.float32) for name, shape in leaves.items()}
            for module, leaves in shapes.items()}


def gradients(params, seed=1):
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for scale in GRADIENT_SCALES:
        raw = jax.tree_util.tree_map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
        norm = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in jax.tree_util.tree_leaves(raw)))
        out.append(jax.tree_util.tree_map(lambda g: g * np.float32(scale / norm), raw))
    return out


def run_updates(optimizer, params, grads):
    import jax
    import optax

    update = jax.jit(optimizer.update)
    state = optimizer.init(params)
    trajectory = []
    for grad in grads:
        updates, state = update(grad, state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append(jax.device_get(params))
    return trajectory


def optax_reference(name, schedule, weight_decay, decay_mask, warmup):
    """Each optimizer as optax spells it, with the hyperparameters the README says it takes from the flags."""
    import optax

    from t2i_flax.optim import weight_decay_mask

    mask = weight_decay_mask if decay_mask else None
    inner = {"adamw": lambda: optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, mask=mask),
             "adafactor": lambda: optax.adafactor(learning_rate=schedule),
             "lion": lambda: optax.lion(schedule, b1=0.9, b2=0.99, weight_decay=weight_decay, mask=mask),
             "prodigy": lambda: optax.contrib.prodigy(schedule, betas=(0.9, 0.999), eps=1e-8,
                                                      weight_decay=weight_decay, safeguard_warmup=warmup)}[name]()
    return optax.chain(optax.clip_by_global_norm(OPTIMIZER_CLIP), inner)


@pytest.mark.parametrize("name,decay_mask", [("adamw", False), ("adamw", True), ("adafactor", False),
                                             ("lion", False), ("lion", True), ("prodigy", False)])
def test_each_optimizer_equals_optax_with_clipping_and_the_schedule(name, decay_mask):
    """Five updates with a warmup + linear decay schedule, clipping on some: bit for bit optax's own chain. (Prodigy
    at lr 1.0, its own scale: it multiplies its estimated step size.)"""
    import jax
    import numpy as np

    from t2i_flax import optim

    lr = 1.0 if name == "prodigy" else OPTIMIZER_LR
    schedule = optim.learning_rate_schedule("linear", lr, OPTIMIZER_WARMUP, OPTIMIZER_TOTAL)
    params = small_tree()
    grads = gradients(params)
    ours = run_updates(optim.make_optimizer(schedule, weight_decay=0.1, max_grad_norm=OPTIMIZER_CLIP,
                                            decay_mask=decay_mask, name=name, warmup=True), params, grads)
    want = run_updates(optax_reference(name, schedule, 0.1, decay_mask, True), params, grads)
    for index, (got, expected) in enumerate(zip(ours, want)):
        for path, value in jax.tree_util.tree_leaves_with_path(expected):
            leaf = got
            for key in path:
                leaf = leaf[key.key]
            assert np.asarray(leaf).tobytes() == np.asarray(value).tobytes(), (index, jax.tree_util.keystr(path))
    moved = np.abs(ours[-1]["proj"]["kernel"] - params["proj"]["kernel"]).max()
    assert moved > (1e-6 if name == "prodigy" else 1e-4), moved  # the updates really moved the weights
    assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(ours[-1]))


def test_lion_is_the_papers_update():
    """Lion's rule written out (Chen et al. 2023, as lion-pytorch): c = b1 m + (1 - b1) g; p -= lr (sign(c) + wd p);
    m = b2 m + (1 - b2) g; after clipping, with the schedule's lr of each update."""
    import jax
    import numpy as np

    from t2i_flax import optim

    schedule = optim.learning_rate_schedule("linear", OPTIMIZER_LR, OPTIMIZER_WARMUP, OPTIMIZER_TOTAL)
    params = small_tree()
    grads = gradients(params)
    ours = run_updates(optim.make_optimizer(schedule, weight_decay=0.1, max_grad_norm=OPTIMIZER_CLIP, name="lion"),
                       params, grads)
    p = jax.tree_util.tree_map(lambda x: x.astype(np.float64), params)
    m = jax.tree_util.tree_map(np.zeros_like, p)
    for index, grad in enumerate(grads):
        norm = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in jax.tree_util.tree_leaves(grad)))
        g = jax.tree_util.tree_map(lambda x: x.astype(np.float64) * min(1.0, OPTIMIZER_CLIP / norm), grad)
        lr = float(schedule(index))
        c = jax.tree_util.tree_map(lambda m_, g_: 0.9 * m_ + 0.1 * g_, m, g)
        p = jax.tree_util.tree_map(lambda p_, c_: p_ - lr * (np.sign(c_) + 0.1 * p_), p, c)
        m = jax.tree_util.tree_map(lambda m_, g_: 0.99 * m_ + 0.01 * g_, m, g)
        for got, want in zip(jax.tree_util.tree_leaves(ours[index]), jax.tree_util.tree_leaves(p)):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)  # float32 against float64: measured <= 1.9e-7


def test_adafactor_equals_transformers_adafactor():
    """optax's Adafactor defaults against transformers' Adafactor(scale_parameter=True, relative_step=False,
    warmup_init=False) (kohya's usual setting) with the same lr per update, after the same clipping: the factored
    (128 x 130) kernel and the unfactored leaves. Leaves with a side < 128 differ by design (optax keeps their full
    second moment; transformers factors every matrix), so the 4-D kernel is left out of the comparison."""
    import numpy as np
    import torch
    from transformers.optimization import Adafactor

    from t2i_flax import optim

    schedule = optim.learning_rate_schedule("linear", OPTIMIZER_LR, OPTIMIZER_WARMUP, OPTIMIZER_TOTAL)
    params = {"proj": small_tree()["proj"], "norm": small_tree()["norm"]}
    grads = gradients(params)
    ours = run_updates(optim.make_optimizer(schedule, max_grad_norm=OPTIMIZER_CLIP, name="adafactor"), params, grads)
    names = [("proj", "kernel"), ("proj", "bias"), ("norm", "scale")]
    torch_params = [torch.nn.Parameter(torch.tensor(params[a][b])) for a, b in names]
    torch_optimizer = Adafactor(torch_params, lr=OPTIMIZER_LR, scale_parameter=True, relative_step=False,
                                warmup_init=False)
    for index, grad in enumerate(grads):
        for parameter, (a, b) in zip(torch_params, names):
            parameter.grad = torch.tensor(grad[a][b])
        torch.nn.utils.clip_grad_norm_(torch_params, OPTIMIZER_CLIP)
        torch_optimizer.param_groups[0]["lr"] = float(schedule(index))
        torch_optimizer.step()
        for parameter, (a, b) in zip(torch_params, names):
            # measured <= 2.4e-7 (the updates move the weights by up to 2.7e-2)
            np.testing.assert_allclose(ours[index][a][b], parameter.detach().numpy(), rtol=0, atol=1e-6,
                                       err_msg=f"update {index + 1} {a}/{b}")


def test_prodigy_safeguards_its_estimate_when_the_first_lr_is_0():
    """optax's Prodigy divides by the sum of its lr-weighted gradient sums: a first update at lr 0 (any warmup)
    makes that 0/0 and every weight NaN, unless safeguard_warmup (which the trainer turns on for a warmup)."""
    import jax
    import numpy as np

    from t2i_flax import optim

    schedule = optim.learning_rate_schedule("linear", 1.0, OPTIMIZER_WARMUP, OPTIMIZER_TOTAL)
    params = small_tree()
    grads = gradients(params)[:2]
    unguarded = run_updates(optim.make_optimizer(schedule, name="prodigy", warmup=False), params, grads)
    assert np.isnan(unguarded[-1]["proj"]["kernel"]).all()
    guarded = run_updates(optim.make_optimizer(schedule, name="prodigy", warmup=True), params, grads)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(guarded))
    assert config_of(optimizer="prodigy", lr_scheduler="constant_with_warmup", lr_warmup_steps=10).optimizer.warmup
    assert config_of(optimizer="prodigy", learning_rate=0.0).optimizer.warmup
    assert not config_of(optimizer="prodigy", lr_warmup_steps=10).optimizer.warmup  # constant ignores the warmup
    assert not config_of(optimizer="prodigy", lr_scheduler="cosine", lr_warmup_steps=0).optimizer.warmup


def test_optimizer_flag_resume_check_card_and_refusals():
    args = cli.build_parser().parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "d"])
    assert args.optimizer == "adamw"
    config = config_of(optimizer="lion")
    assert_checked_on_resume(config, ["--optimizer"])
    assert "AdamW" in card_of(config_of()) and "optimizer" not in card_of(config_of())  # as before
    assert card_of(config)["optimizer"] == "Lion (optax), betas 0.9/0.99, weight decay 0.01"
    assert card_of(config_of(optimizer="adafactor"))["optimizer"].startswith("Adafactor (optax's defaults")
    assert card_of(config_of(optimizer="prodigy", learning_rate=1.0, lr_scheduler="cosine", lr_warmup_steps=5))[
        "optimizer"] == "Prodigy (optax), betas 0.9/0.999, weight decay 0.01, eps 1e-08, safeguarded warmup"
    with pytest.raises(FlagError, match="--optimizer 'sgd' is not one of: adamw, adafactor, lion, prodigy"):
        config_of(optimizer="sgd")
    for name, why in (("adafactor", "has no weight decay"), ("prodigy", "decays every parameter")):
        with pytest.raises(FlagError, match=f"--no_decay_bias_and_norm is for --optimizer adamw or lion: {name} {why}"):
            config_of(optimizer=name, no_decay_bias_and_norm=True)
    assert config_of(optimizer="lion", no_decay_bias_and_norm=True).optimizer.no_decay_bias_and_norm


# ---- --rescale_betas_zero_snr ---------------------------------------------------------------------------------

ZERO_SNR_BASE = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                 "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction"}


def test_zero_terminal_snr_training_schedule_equals_diffusers_ddpm():
    """The rescale against diffusers' rescale_zero_terminal_snr, and the training math (add_noise, the velocity
    target) against DDPMScheduler(rescale_betas_zero_snr=True), the last timestep included: there alphas_cumprod is
    exactly 0, the input pure noise and the target -x_0."""
    import numpy as np
    import torch
    from diffusers import DDPMScheduler
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    from t2i_flax.diffusion import noise

    config = noise.zero_terminal_snr_config(ZERO_SNR_BASE)
    betas = noise.betas_for(config)
    # float32; measured 5.4e-7 (torch's vectorised sqrt is 1 ulp off on a few entries)
    np.testing.assert_allclose(noise.rescale_zero_terminal_snr(betas),
                               rescale_zero_terminal_snr(torch.tensor(betas)).numpy(), rtol=0, atol=2e-6)
    schedule = noise.schedule_from_config(config)
    reference = DDPMScheduler.from_config(config)
    assert schedule.alphas_cumprod[-1] == 0.0 == float(reference.alphas_cumprod[-1])
    np.testing.assert_allclose(schedule.alphas_cumprod, reference.alphas_cumprod.numpy(), rtol=0, atol=1e-6)  # 2.1e-7
    rng = np.random.default_rng(0)
    latents, eps = (rng.standard_normal((5, 4, 8, 8)).astype(np.float32) for _ in range(2))
    timesteps = np.array([999, 998, 500, 1, 0])
    args = [torch.tensor(latents), torch.tensor(eps), torch.tensor(timesteps)]
    noisy = np.asarray(schedule.add_noise(latents, eps, timesteps))
    np.testing.assert_allclose(noisy, reference.add_noise(*args).numpy(), rtol=0, atol=2e-6)
    np.testing.assert_array_equal(noisy[0], eps[0])  # the last timestep: pure noise
    target = np.asarray(schedule.target(latents, eps, timesteps))
    np.testing.assert_allclose(target, reference.get_velocity(*args).numpy(), rtol=0, atol=2e-6)
    np.testing.assert_array_equal(target[0], -latents[0])


def test_zero_terminal_snr_flag_config_resume_card_and_epsilon_refusal():
    from t2i_flax.diffusion import noise
    from t2i_flax.errors import ModelError

    args = cli.build_parser().parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "d",
                                          "--rescale_betas_zero_snr"])
    assert args.rescale_betas_zero_snr
    config = config_of(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    assert_checked_on_resume(config_of(rescale_betas_zero_snr=True), ["--rescale_betas_zero_snr"])
    assert card_of(config)["zero terminal SNR"] == "yes (rescaled betas, trailing timesteps)"
    assert "zero terminal SNR" not in card_of(config_of())
    with pytest.raises(ModelError, match="needs v-prediction.*--prediction_type v_prediction"):
        noise.schedule_from_config(dict(ZERO_SNR_BASE, rescale_betas_zero_snr=True), "epsilon")
    # a model whose own config has it (refused before) trains with it
    assert noise.schedule_from_config(dict(ZERO_SNR_BASE, rescale_betas_zero_snr=True)).alphas_cumprod[-1] == 0.0


# ---- --guidance_rescale (generate) / --validation_guidance_rescale ----------------------------------------------


def test_rescale_noise_cfg_equals_diffusers():
    """Our rescale against diffusers' rescale_noise_cfg (torch's unbiased std per sample) at 0, 0.7 and 1; the
    sampler's parity with diffusers' pipeline is in test_sample.py."""
    import numpy as np
    import torch
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as reference

    from t2i_flax.diffusion.sample import rescale_noise_cfg

    rng = np.random.default_rng(0)
    uncond, text = rng.standard_normal((2, 3, 4, 8, 8)).astype(np.float32) * np.float32([[[[[1.0]]]], [[[[2.0]]]]])
    guided = uncond + 7.5 * (text - uncond)
    for rescale in (0.0, 0.7, 1.0):
        want = reference(torch.tensor(guided), torch.tensor(text), guidance_rescale=rescale).numpy()
        np.testing.assert_allclose(np.asarray(rescale_noise_cfg(guided, text, rescale)), want, rtol=1e-5, atol=1e-6)


def test_guidance_rescale_flags():
    from t2i_flax import generate

    args = generate.build_parser().parse_args(["--model", "m", "--prompt", "p", "--out", "o"])
    assert args.guidance_rescale == 0.0
    with pytest.raises(FlagError, match="--guidance_rescale must be between 0 and 1"):
        generate.check_guidance_rescale(1.5)
    config = config_of(validation_guidance_rescale=0.7)
    assert config.validation.validation_guidance_rescale == 0.7
    assert config.resume_differences(config_of().to_dict()) == []  # a validation setting: may change
    with pytest.raises(FlagError, match="--validation_guidance_rescale must be between 0 and 1"):
        config_of(validation_guidance_rescale=-0.1)


# ---- --dream_training ------------------------------------------------------------------------------------------


def test_dream_flags_resume_check_card_and_refusal():
    """DREAM's math is checked against diffusers' compute_dream_and_update_latents in test_step_vs_torch.py; its
    v-prediction refusal in test_optimizers_sharded.py (it needs the model's prediction type)."""
    args = cli.build_parser().parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "d"])
    assert (args.dream_training, args.dream_detail_preservation) == (False, 1.0)  # the script's defaults
    config = config_of(dream_training=True, dream_detail_preservation=0.5)
    assert_checked_on_resume(config, ["--dream_training", "--dream_detail_preservation"])
    assert card_of(config)["DREAM"] == "detail preservation 0.5"
    assert "DREAM" not in card_of(config_of())
    with pytest.raises(FlagError, match="--dream_detail_preservation must be positive"):
        config_of(dream_training=True, dream_detail_preservation=0.0)


# ---- off changes nothing ---------------------------------------------------------------------------------------


def test_the_options_at_their_off_values_lower_the_default_step(pipeline_dir):
    """Issue 18's options at their off values, given explicitly (--input_perturbation 0, --timestep_bias_strategy none,
    --optimizer adamw, --validation_split 0; --dream_training and --rescale_betas_zero_snr are switches, off when
    absent), with the companions they ignore when off set to other values: the trainer's setup lowers the same train
    step (StableHLO text) as with the default flags, and the options' StepConfig fields stay at the values that leave
    their code out of the program. A held-out split changes which images train, not the step. The comparison sees a
    difference: --input_perturbation 0.1 lowers another program."""
    import jax

    from t2i_flax.aot.cli import build_setup

    def lowered(*flags):
        config = cli.parse_config(["--pretrained_model_name_or_path", pipeline_dir, "--dataset_name", "d",
                                   "--resolution", "32", "--train_batch_size", "1", *flags])
        built = build_setup(config, jax.devices())
        return built.lower().as_text(), built.step_config

    default, default_config = lowered()
    off, off_config = lowered("--input_perturbation", "0", "--timestep_bias_strategy", "none",
                              "--timestep_bias_multiplier", "3", "--timestep_bias_portion", "0.5",
                              "--dream_detail_preservation", "0.5", "--optimizer", "adamw", "--validation_split", "0")
    assert off == default
    for step_config in (default_config, off_config):
        assert (step_config.input_perturbation, step_config.timestep_bias, step_config.dream_detail_preservation) == (
            0.0, None, None)
    assert lowered("--validation_split", "4")[0] == default
    assert lowered("--input_perturbation", "0.1")[0] != default

