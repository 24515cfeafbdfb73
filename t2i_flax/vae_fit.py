"""A short reconstruction fit of a (tiny, random) VAE to a set of images, as `make demo` does before it trains
the UNet: a diffusion model can only draw what its VAE can decode.

    params, losses = fit(vae, params, images_BCHW, steps=300)      # images in [-1, 1]
    error = reconstruction_error(vae, params, images_BCHW)         # mean squared error, posterior mean
    scaling_factor = latent_scaling_factor(vae, params, images_BCHW)

The loss is SD's VAE loss without its perceptual and GAN terms: the mean squared error of the image decoded
from a posterior sample, plus `kl_weight` x the KL divergence to N(0, 1) per image value. Seeded and
single-device: the same arguments give the same parameters."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def load_images(paths) -> np.ndarray:
    """PNG/JPEG files of one size -> float32 (N, 3, H, W) in [-1, 1], as the trainer feeds the VAE."""
    from PIL import Image

    images_NHWC = np.stack([np.asarray(Image.open(path).convert("RGB"), np.float32) for path in paths])
    return np.transpose(images_NHWC / 127.5 - 1.0, (0, 3, 1, 2))  # NHWC -> NCHW


def _reconstruct(vae, params, images_BCHW, key=None):
    """(decoded images, the posterior); decoded from a posterior sample with `key`, else from its mean."""
    posterior = vae.apply({"params": params}, images_BCHW, method=vae.encode).latent_dist
    latents_BCHW = posterior.mode() if key is None else posterior.sample(key)
    return vae.apply({"params": params}, latents_BCHW, method=vae.decode).sample, posterior


def fit(vae, params, images_BCHW, steps: int = 300, batch_size: int = 32, learning_rate: float = 2e-3,
        kl_weight: float = 1e-4, seed: int = 0):
    """Adam with a cosine decay to 0 over `steps` random batches; returns (params, per-step losses)."""
    images_BCHW = jnp.asarray(images_BCHW, jnp.float32)
    batch_size = min(batch_size, images_BCHW.shape[0])
    values_per_image = float(np.prod(images_BCHW.shape[1:]))
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

    def loss_fn(params, batch_BCHW, key):
        decoded_BCHW, posterior = _reconstruct(vae, params, batch_BCHW, key)
        mse = jnp.mean(jnp.square(decoded_BCHW - batch_BCHW))
        return mse + kl_weight * jnp.mean(posterior.kl()) / values_per_image

    @jax.jit
    def train_step(params, opt_state, images_BCHW, step):  # the images are an argument, not a constant
        batch_key, sample_key = jax.random.split(jax.random.fold_in(jax.random.key(seed), step))
        indices = jax.random.choice(batch_key, images_BCHW.shape[0], (batch_size,), replace=False)
        loss, grads = jax.value_and_grad(loss_fn)(params, images_BCHW[indices], sample_key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = start_with_small_std(params)
    opt_state = optimizer.init(params)
    losses = []
    for step in range(steps):
        params, opt_state, loss = train_step(params, opt_state, images_BCHW, step)
        losses.append(loss)
    return params, [float(loss) for loss in losses]


INITIAL_LOGVAR = -6.0


def start_with_small_std(params):
    """A random VAE's posterior std is ~1, as large as its means: the decoder would learn from noise first.
    Starting the logvar half of quant_conv's bias at INITIAL_LOGVAR lets it learn from the means at once;
    the KL term then raises the std where that costs no reconstruction."""
    if "quant_conv" not in params:
        return params
    bias = params["quant_conv"]["bias"]
    logvar_bias = jnp.full_like(bias[bias.shape[0] // 2:], INITIAL_LOGVAR)
    quant_conv = dict(params["quant_conv"], bias=jnp.concatenate([bias[:bias.shape[0] // 2], logvar_bias]))
    return dict(params, quant_conv=quant_conv)


def _batches(images_BCHW, batch_size: int = 64):
    for start in range(0, len(images_BCHW), batch_size):
        yield jnp.asarray(images_BCHW[start:start + batch_size], jnp.float32)


def reconstruction_error(vae, params, images_BCHW) -> float:
    """Mean squared error (images in [-1, 1]) of the images decoded from their posterior means."""
    reconstruct = jax.jit(lambda params, batch: jnp.sum(jnp.square(_reconstruct(vae, params, batch)[0] - batch)))
    total = sum(float(reconstruct(params, batch)) for batch in _batches(images_BCHW))
    return total / np.size(images_BCHW)


def latent_scaling_factor(vae, params, images_BCHW) -> float:
    """1 / the standard deviation of the posterior means: the latents the UNet sees then have unit variance
    (how SD's 0.18215 was chosen)."""
    encode = jax.jit(lambda params, batch: vae.apply({"params": params}, batch, method=vae.encode).latent_dist.mean)
    means = np.concatenate([np.asarray(encode(params, batch)) for batch in _batches(images_BCHW)])
    return float(1.0 / means.std())
