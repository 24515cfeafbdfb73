"""--cache_latents for a run: the VAE encoder runs once per image on the run's mesh (sharded like training) and
the loader then reads the stored posterior moments (the cache itself: t2i_flax/data/latent_cache.py)."""
from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from t2i_flax import sharding, step
from t2i_flax.config import RunConfig
from t2i_flax.errors import DataError
from t2i_flax.metrics import log


def loader_over_cache(config: RunConfig, loader, built, vae_params):
    """Builds (or finds, or completes) the latent cache of the run's data on its mesh (`built`: its
    setup.TrainSetup), then the loader that reads it."""
    from t2i_flax.data import latent_cache

    data_config, mesh, vae, dtype = config.data, built.mesh, built.vae, built.dtype
    if loader.dataset_identity is None:
        raise DataError("--cache_latents: this dataset has no datasets fingerprint, so a cache of it could not be "
                        "told from a stale one; drop --cache_latents")
    encoder = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype),
                                     {name: vae_params[name] for name in step.VAE_ENCODER_PARAMS})
    factor = 2 ** (len(vae.block_out_channels) - 1)
    key_fields = {"vae_encoder": latent_cache.params_digest(encoder), "dtype": jnp.dtype(dtype).name,
                  "vae_config": vae.to_config(), "dataset": loader.dataset_identity,
                  "image_column": data_config.image_column, "resolution": data_config.resolution, "center_crop": True}
    local = jax.local_device_count()
    online = loader.example_fn
    placed = sharding.put(encoder, sharding.tree_shardings(mesh, encoder))
    where = sharding.batch_sharding(mesh)
    encode = jax.jit(lambda params, pixels: step.posterior_moments(vae, params, pixels), out_shardings=(where, where))
    encode_pixels = functools.partial(encode, placed)
    caches = {}
    for target, records in images_by_size(online, loader.held_out).items():
        width, height = target
        fields = key_fields if online.buckets is None else dict(key_fields, bucket=[width, height])
        cache = latent_cache.LatentCache(
            data_config.latent_cache_dir or os.path.join(config.output.output_dir, "latent_cache"), fields,
            records, data_config.random_flip, (vae.latent_channels, height // factor, width // factor),
            jax.process_index(), jax.process_count(), per_host=-(-64 // local) * local,
            flip_first=online.size_conditioning, interpolation=data_config.image_interpolation_mode)
        start = time.perf_counter()
        encoded = cache.build(online.dataset, data_config.image_column, target, encode_pixels, mesh,
                              show_progress=jax.process_index() == 0)
        seconds = time.perf_counter() - start
        what = f"encoded {encoded} of {cache.num_chunks} chunks in {seconds:.1f}s" if encoded else "complete"
        at = "" if online.buckets is None else f" at {width}x{height}"
        log(f"latent cache: {cache.root} ({len(records)} images{at}"
            f"{' x 2 flips' if data_config.random_flip else ''}, {what})")
        caches[target] = cache
    del placed, encode_pixels  # the VAE encoder leaves the devices
    return loader.with_examples(latent_cache.CachedExampleAt(online, caches))


def images_by_size(online, held_out=None) -> dict:
    """{(width, height): the record indices trained or (`held_out`, --validation_split) measured at that size}: every
    usable record at the square resolution, or the records of each aspect-ratio bucket that holds a global batch, and
    the held-out records at their sizes (cached too: the held-out loss reads them as training reads its images)."""
    if online.buckets is None:
        by_size = {(online.resolution, online.resolution): online.records}
    else:
        plan = online.buckets
        by_size = {plan.sizes[bucket]: online.records[plan.bucket_of == bucket]
                   for bucket in range(len(plan.sizes)) if plan.counts[bucket] >= plan.global_batch_size}
    if held_out is not None:
        for size in sorted(set(held_out.sizes)):
            measured = held_out.records[[own == size for own in held_out.sizes]]
            by_size[size] = np.concatenate([by_size.get(size, np.zeros(0, np.int64)), measured])
    return by_size
