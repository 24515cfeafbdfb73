"""Inference schedulers as pure functions: diffusers' DDIM, PNDM (PLMS), Euler and DPM-Solver++ (2M).

    scheduler = make_scheduler(scheduler_config, num_inference_steps, name="euler")
    latents = noise * scheduler.init_noise_sigma
    state = init_state(scheduler, latents.shape)
    for i in range(scheduler.num_steps):            # or one lax.fori_loop: everything below is jnp
        model_input = scale_model_input(scheduler, latents, i)
        model_output = unet(model_input, scheduler.timesteps[i])
        latents, state = step(scheduler, state, model_output, i, latents)

Everything that depends only on the config and the step count (timesteps, sigmas, alphas, multistep
weights) is a numpy table built once by `make_scheduler`; the step functions read row i of those
tables, so the loop body has no Python branch on the step. Arithmetic is float32 whatever the model's
compute dtype.

A scheduler chosen by name takes its config the way diffusers' `SchedulerClass.from_config(other_config)`
does: the keys it knows are read from the file, the others take the chosen scheduler's own defaults
(Euler from SD 1.5's PNDM config, which has no timestep_spacing, uses Euler's "linspace"). One
deliberate difference: diffusers' PNDMScheduler defaults to skip_prk_steps=False (a Runge-Kutta warm-up
that no SD checkpoint uses); here "pndm" is PLMS with skip_prk_steps, taken as true when the config does
not say, and a config saying false is refused."""
from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np

from t2i_flax import errors
from t2i_flax.diffusion.noise import alphas_cumprod_for, check_zero_terminal_snr

CLASS_NAMES = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
               "dpm++2m": "DPMSolverMultistepScheduler"}
NAMES = tuple(CLASS_NAMES)
DEFAULT_NAME = "pndm"  # for a config of a class we do not implement (e.g. the training DDPMScheduler)

_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 trained_betas=None, prediction_type="epsilon", steps_offset=0)
# The __init__ defaults of diffusers 0.42's classes, for the keys that change what we compute.
DEFAULTS = {
    "ddim": dict(_SCHEDULE, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, thresholding=False,
                 timestep_spacing="leading", rescale_betas_zero_snr=False),
    "pndm": dict(_SCHEDULE, skip_prk_steps=False, set_alpha_to_one=False, timestep_spacing="leading"),
    "euler": dict(_SCHEDULE, interpolation_type="linear", use_karras_sigmas=False, use_exponential_sigmas=False,
                  use_beta_sigmas=False, timestep_spacing="linspace", timestep_type="discrete",
                  rescale_betas_zero_snr=False, final_sigmas_type="zero"),
    "dpm++2m": dict(_SCHEDULE, solver_order=2, thresholding=False, algorithm_type="dpmsolver++",
                    solver_type="midpoint", lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
                    use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False,
                    final_sigmas_type="zero", lambda_min_clipped=-math.inf, variance_type=None,
                    timestep_spacing="linspace", rescale_betas_zero_snr=False, use_dynamic_shifting=False),
}
# Values we implement; anything else in a resolved config is refused with one line. None counts as off.
SUPPORTED = {
    "prediction_type": ("epsilon", "v_prediction"),
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "skip_prk_steps": (True,),
    "interpolation_type": ("linear",),
    "timestep_type": ("discrete",),
    "final_sigmas_type": ("zero", "sigma_min"),
    "algorithm_type": ("dpmsolver++",),
    "solver_type": ("midpoint", "heun"),
    "solver_order": (1, 2),
    "variance_type": (None,),
    **{key: (False, None) for key in ("thresholding", "use_karras_sigmas",
                                      "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                                      "use_flow_sigmas", "use_dynamic_shifting")},
}


def default_name(config: dict) -> str:
    """The scheduler the config names (its _class_name), or DEFAULT_NAME for a class we do not implement."""
    by_class = {class_name: name for name, class_name in CLASS_NAMES.items()}
    return by_class.get(config.get("_class_name"), DEFAULT_NAME)


def resolve_config(name: str, config: dict) -> dict:
    """The config diffusers' CLASS_NAMES[name].from_config(config) would build (for the keys in DEFAULTS)."""
    if name not in DEFAULTS:
        raise errors.FlagError(f"scheduler {name!r} is not one of: {', '.join(NAMES)}")
    # Keys diffusers filled with the original class's defaults are not the file's (from_config drops them).
    given = {k: v for k, v in config.items() if k not in config.get("_use_default_values", ())}
    resolved = {key: given.get(key, default) for key, default in DEFAULTS[name].items()}
    if name == "pndm" and given.get("skip_prk_steps") is None:
        resolved["skip_prk_steps"] = True
    for key, allowed in SUPPORTED.items():
        if key in resolved and resolved[key] not in allowed:
            raise errors.ModelError(
                f"scheduler config {key}={resolved[key]!r} is not supported by t2i_flax's {name} scheduler "
                f"(supported: {', '.join(repr(a) for a in allowed)}); pick another with --scheduler")
    return resolved


@flax.struct.dataclass
class Scheduler:
    """One scheduler for one step count. The arrays are float32 numpy tables with a row per denoising
    step (the loop's index i); `kind`, `prediction_type` and `clip_sample_range` are static."""
    timesteps: np.ndarray         # (N,) what the UNet is given at step i
    init_noise_sigma: np.ndarray  # () the initial noise is multiplied by it
    tables: dict                  # name -> (N,) or (N, k) per-step coefficients of this kind
    kind: str = flax.struct.field(pytree_node=False)  # one of NAMES
    prediction_type: str = flax.struct.field(pytree_node=False)
    clip_sample_range: float | None = flax.struct.field(pytree_node=False)  # DDIM with clip_sample; else None

    @property
    def num_steps(self) -> int:
        """UNet calls in the loop (PNDM: num_inference_steps + 1)."""
        return int(self.timesteps.shape[0])


@flax.struct.dataclass
class SchedulerState:
    """What a multistep scheduler carries from step to step (float32)."""
    model_outputs: jax.Array  # (H, B, C, h, w): earlier model outputs, newest first (H = 0, 1 or 3)
    first_sample: jax.Array   # PNDM: the sample of step 0, which its second step restarts from; else (0,)


def make_scheduler(config: dict, num_inference_steps: int, name: str | None = None) -> Scheduler:
    """`name` (one of NAMES) or, when None, the config's own class (see `default_name`)."""
    name = name or default_name(config)
    resolved = resolve_config(name, config)
    train_steps = int(resolved["num_train_timesteps"])
    if not 1 <= num_inference_steps <= train_steps:
        raise errors.FlagError(f"--steps {num_inference_steps} must be between 1 and the model's "
                               f"num_train_timesteps ({train_steps})")
    alphas_cumprod = alphas_cumprod_for(resolved)  # with rescale_betas_zero_snr: its last value is 0
    if resolved.get("rescale_betas_zero_snr"):  # DDIM, Euler, DPM-Solver (PNDM ignores the key, as diffusers')
        check_zero_terminal_snr(resolved, resolved["prediction_type"])
        if name in ("euler", "dpm++2m"):  # as diffusers': close to 0, so that the first sigma is finite (~4096)
            alphas_cumprod = np.concatenate([alphas_cumprod[:-1], [2.0 ** -24]]).astype(np.float32)
    build = {"ddim": _ddim, "pndm": _pndm, "euler": _euler, "dpm++2m": _dpm_solver}[name]
    timesteps, init_noise_sigma, tables = build(resolved, alphas_cumprod, num_inference_steps)
    clip = float(resolved["clip_sample_range"]) if name == "ddim" and resolved["clip_sample"] else None
    return Scheduler(timesteps=np.asarray(timesteps, np.float32), init_noise_sigma=np.float32(init_noise_sigma),
                     tables={k: np.asarray(v, np.float32) for k, v in tables.items()}, kind=name,
                     prediction_type=resolved["prediction_type"], clip_sample_range=clip)


# ---- timestep tables (numpy, as diffusers' set_timesteps) -------------------------------------------

def spaced_timesteps(config: dict, num_inference_steps: int) -> np.ndarray:
    """Descending int64 timesteps of DDIM, Euler (as floats there) and, ascending, PNDM's base grid."""
    train_steps, spacing = int(config["num_train_timesteps"]), config["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, train_steps - 1, num_inference_steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        ratio = train_steps // num_inference_steps
        return (np.arange(num_inference_steps) * ratio)[::-1].astype(np.int64) + int(config["steps_offset"])
    ratio = train_steps / num_inference_steps
    return np.round(np.arange(train_steps, 0, -ratio)).astype(np.int64) - 1


def _alphas_at(config, alphas_cumprod, timesteps) -> np.ndarray:
    """alphas_cumprod[t]; for t < 0 the 'final' alpha (1 with set_alpha_to_one, else alphas_cumprod[0])."""
    final = 1.0 if config["set_alpha_to_one"] else alphas_cumprod[0]
    return np.where(timesteps >= 0, alphas_cumprod[np.maximum(timesteps, 0)], final).astype(np.float32)


def _ddim(config, alphas_cumprod, num_inference_steps):
    """DDIM (eta 0) steps from t to t - train_steps // S, whatever the spacing (as diffusers)."""
    timesteps = spaced_timesteps(config, num_inference_steps)
    previous = timesteps - int(config["num_train_timesteps"]) // num_inference_steps
    tables = {"alpha": alphas_cumprod[timesteps], "alpha_prev": _alphas_at(config, alphas_cumprod, previous)}
    return timesteps, 1.0, tables


# PLMS weights of [this output, the stored ones newest first] by how many outputs the formula uses.
_PLMS_WEIGHTS = {1: (1.0, 0.0, 0.0, 0.0), 2: (3 / 2, -1 / 2, 0.0, 0.0), 3: (23 / 12, -16 / 12, 5 / 12, 0.0),
                 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _pndm(config, alphas_cumprod, num_inference_steps):
    """PLMS with skip_prk_steps: S + 1 UNet calls (1 for S = 1). Step 0 is Euler-like from t0; step 1 re-evaluates at
    t1 and restarts from the step-0 sample with the mean of both outputs (a Heun step); from step 2 on,
    Adams-Bashforth of order 2, 3, then 4 over the stored outputs (step 1's output is not stored)."""
    base = spaced_timesteps(config, num_inference_steps)[::-1]  # ascending, as diffusers' _timesteps
    timesteps = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
    ratio = int(config["num_train_timesteps"]) // num_inference_steps
    current, previous = timesteps.copy(), timesteps - ratio  # the step goes from alpha[current] to alpha[previous]
    if len(timesteps) > 1:  # the restart step goes over step 0's interval again
        current[1], previous[1] = timesteps[1] + ratio, timesteps[1]
    weights, stored = [], 0
    for i in range(len(timesteps)):
        if i == 1:
            weights.append((0.5, 0.5, 0.0, 0.0))
            continue
        stored = min(stored + 1, 4)  # diffusers keeps at most 4 outputs (3 old + this one)
        weights.append(_PLMS_WEIGHTS[stored])
    index = np.arange(len(timesteps))
    tables = {"alpha": alphas_cumprod[current], "alpha_prev": _alphas_at(config, alphas_cumprod, previous),
              "weights": np.asarray(weights),
              "store": (index != 1).astype(np.float32), "restart": (index == 1).astype(np.float32)}
    return timesteps, 1.0, tables


def _train_sigmas(alphas_cumprod) -> np.ndarray:
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).astype(np.float32)


def _final_sigma(config, alphas_cumprod) -> float:
    if config["final_sigmas_type"] == "sigma_min":
        return float(((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5)
    return 0.0


def _euler(config, alphas_cumprod, num_inference_steps):
    train_steps, spacing = int(config["num_train_timesteps"]), config["timestep_spacing"]
    if spacing == "linspace":  # Euler keeps these fractional
        timesteps = np.linspace(0, train_steps - 1, num_inference_steps, dtype=np.float32)[::-1]
    else:
        timesteps = spaced_timesteps(config, num_inference_steps).astype(np.float32)
    train_sigmas = _train_sigmas(alphas_cumprod)
    sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
    sigmas = np.concatenate([sigmas, [_final_sigma(config, alphas_cumprod)]]).astype(np.float32)
    max_sigma = sigmas.max()
    init_noise_sigma = max_sigma if spacing in ("linspace", "trailing") else (max_sigma ** 2 + 1) ** 0.5
    return timesteps, init_noise_sigma, {"sigma": sigmas[:-1], "sigma_next": sigmas[1:]}


def _dpm_solver(config, alphas_cumprod, num_inference_steps):
    """DPM-Solver++ multistep. Each step is x' = a x + b0 D_now + b1 D_before in the predicted clean
    latents D: the coefficients come from the log-SNR steps h, in float64 from diffusers' float32 sigmas."""
    train_steps, spacing = int(config["num_train_timesteps"]), config["timestep_spacing"]
    log_snr = np.log(np.sqrt(alphas_cumprod)) - np.log(np.sqrt(1 - alphas_cumprod))
    last = train_steps - int(np.searchsorted(log_snr[::-1], config["lambda_min_clipped"]))
    if spacing == "linspace":
        timesteps = np.linspace(0, last - 1, num_inference_steps + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = last // (num_inference_steps + 1)
        timesteps = (np.arange(num_inference_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64)
        timesteps = timesteps + int(config["steps_offset"])
    else:
        timesteps = np.arange(last, 0, -train_steps / num_inference_steps).round().astype(np.int64) - 1
    train_sigmas = _train_sigmas(alphas_cumprod)
    sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
    sigmas = np.concatenate([sigmas, [_final_sigma(config, alphas_cumprod)]]).astype(np.float32).astype(np.float64)
    alpha = 1 / np.sqrt(sigmas ** 2 + 1)  # of x_t = alpha x_0 + sigma_t noise, with sigma_t = sigma * alpha
    sigma_t = sigmas * alpha
    with np.errstate(divide="ignore"):  # a final sigma of 0 has an infinite log-SNR: exp(-h) = 0 there
        lam = np.log(alpha) - np.log(sigma_t)
    steps = len(timesteps)
    few_steps = config["lower_order_final"] and steps < 15
    a, b_now, b_before = np.zeros(steps), np.zeros(steps), np.zeros(steps)
    for i in range(steps):
        h = lam[i + 1] - lam[i]
        a[i] = sigma_t[i + 1] / sigma_t[i]
        phi = alpha[i + 1] * (np.exp(-h) - 1.0)  # -(1 - e^-h) alpha_next
        lower_final = config["euler_at_final"] or few_steps or config["final_sigmas_type"] == "zero"
        if config["solver_order"] == 1 or i == 0 or (i == steps - 1 and lower_final):
            b_now[i] = -phi
            continue
        r = (lam[i] - lam[i - 1]) / h  # D1 = (D_now - D_before) / r
        if config["solver_type"] == "midpoint":
            d1 = -0.5 * phi
        else:  # heun
            d1 = alpha[i + 1] * ((np.exp(-h) - 1.0) / h + 1.0)
        b_now[i], b_before[i] = -phi + d1 / r, -d1 / r
    tables = {"alpha": alpha[:-1], "sigma_t": sigma_t[:-1], "a": a, "b_now": b_now, "b_before": b_before}
    return timesteps, 1.0, tables


# ---- the pure per-step functions (jnp, float32) ---------------------------------------------------

_HISTORY = {"ddim": 0, "euler": 0, "pndm": 3, "dpm++2m": 1}


def init_state(scheduler: Scheduler, latents_shape) -> SchedulerState:
    history = _HISTORY[scheduler.kind]
    first_shape = tuple(latents_shape) if scheduler.kind == "pndm" else (0,)
    return SchedulerState(model_outputs=jnp.zeros((history, *latents_shape), jnp.float32),
                          first_sample=jnp.zeros(first_shape, jnp.float32))


def scale_model_input(scheduler: Scheduler, sample, i):
    """The UNet's input at step i: Euler divides by sqrt(sigma^2 + 1); the others pass it through."""
    if scheduler.kind != "euler":
        return sample
    sigma = jnp.asarray(scheduler.tables["sigma"])[i]
    return sample / jnp.sqrt(sigma ** 2 + 1)


def step(scheduler: Scheduler, state: SchedulerState, model_output, i, sample):
    """x_t -> x_{t-1} at step i: (prev_sample float32, new state)."""
    row = {name: jnp.asarray(table)[i] for name, table in scheduler.tables.items()}  # this step's coefficients
    model_output = model_output.astype(jnp.float32)
    sample = sample.astype(jnp.float32)
    kind_step = {"ddim": _ddim_step, "pndm": _pndm_step, "euler": _euler_step, "dpm++2m": _dpm_solver_step}
    return kind_step[scheduler.kind](scheduler, row, state, model_output, sample)


def _ddim_step(scheduler, row, state, model_output, sample):  # eta = 0, as the pipeline's default
    alpha, alpha_prev = row["alpha"], row["alpha_prev"]
    beta = 1 - alpha
    if scheduler.prediction_type == "epsilon":
        original = (sample - beta ** 0.5 * model_output) / alpha ** 0.5
        epsilon = model_output
    else:
        original = alpha ** 0.5 * sample - beta ** 0.5 * model_output
        epsilon = alpha ** 0.5 * model_output + beta ** 0.5 * sample
    if scheduler.clip_sample_range is not None:
        original = jnp.clip(original, -scheduler.clip_sample_range, scheduler.clip_sample_range)
    return alpha_prev ** 0.5 * original + (1 - alpha_prev) ** 0.5 * epsilon, state


def _pndm_step(scheduler, row, state, model_output, sample):
    stored_CBCHW = state.model_outputs  # newest first
    weights = row["weights"]
    combined = weights[0] * model_output + jnp.tensordot(weights[1:], stored_CBCHW, axes=1)
    restart = row["restart"] > 0
    sample = jnp.where(restart, state.first_sample, sample)
    alpha, alpha_prev = row["alpha"], row["alpha_prev"]
    beta, beta_prev = 1 - alpha, 1 - alpha_prev
    if scheduler.prediction_type == "v_prediction":
        combined = alpha ** 0.5 * combined + beta ** 0.5 * sample
    denominator = alpha * beta_prev ** 0.5 + (alpha * beta * alpha_prev) ** 0.5
    prev_sample = (alpha_prev / alpha) ** 0.5 * sample - (alpha_prev - alpha) * combined / denominator
    shifted = jnp.concatenate([model_output[None], stored_CBCHW[:-1]])
    stored_CBCHW = jnp.where(row["store"] > 0, shifted, stored_CBCHW)
    # Step 0 saves its sample for the restart of step 1; nothing reads it after that.
    first_sample = jnp.where(restart, state.first_sample, sample)
    return prev_sample, SchedulerState(model_outputs=stored_CBCHW, first_sample=first_sample)


def _euler_step(scheduler, row, state, model_output, sample):  # s_churn = 0, as the pipeline's default
    sigma = row["sigma"]
    if scheduler.prediction_type == "epsilon":
        original = sample - sigma * model_output
    else:
        original = model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)
    derivative = (sample - original) / sigma
    return sample + derivative * (row["sigma_next"] - sigma), state


def _dpm_solver_step(scheduler, row, state, model_output, sample):
    alpha, sigma_t = row["alpha"], row["sigma_t"]
    if scheduler.prediction_type == "epsilon":
        original = (sample - sigma_t * model_output) / alpha
    else:
        original = alpha * sample - sigma_t * model_output
    before = state.model_outputs[0]
    prev_sample = row["a"] * sample + row["b_now"] * original + row["b_before"] * before
    return prev_sample, state.replace(model_outputs=original[None])
