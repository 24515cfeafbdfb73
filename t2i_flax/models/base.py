"""`from_pretrained` / `save_pretrained` shared by our Flax models (the API of the removed diffusers
Flax classes): `Model.from_pretrained(path_or_repo_id, subfolder=...) -> (module, params)`.

A model class provides `from_config(config, dtype, attention)`, `to_config()`, `dummy_inputs()` and the
class attributes `weights_name`, `legacy_weights_name`, `config_name`."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from t2i_flax import hub, weights


class PretrainedMixin:
    weights_name: str
    legacy_weights_name: str
    config_name: str = "config.json"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None,
                        revision: str | None = None, variant: str | None = None, dtype=jnp.float32,
                        cache_dir: str | None = None, attention: str | None = None, param_dtype=np.float32,
                        local_files_only: bool | None = None):
        """Returns (module, params); params are host numpy arrays in `param_dtype` (float32 default),
        `dtype` is the computation dtype."""
        folder = hub.resolve_model_dir(pretrained_model_name_or_path, subfolder, revision, variant, cache_dir,
                                       local_files_only)
        config_path = os.path.join(folder, cls.config_name)
        if not os.path.isfile(config_path):
            raise hub.ModelNotFoundError(f"{folder} has no {cls.config_name}")
        with open(config_path) as handle:
            config = json.load(handle)
        module = cls.from_config(config, dtype=dtype, attention=attention)
        params = weights.load_params(folder, cls.weights_name, cls.legacy_weights_name, module.abstract_params(),
                                     variant=variant, dtype=param_dtype)
        return module, params

    def abstract_params(self):
        """The parameter tree as ShapeDtypeStructs, without materialising any weights."""
        return jax.eval_shape(self.init_params, jax.random.key(0))

    def init_params(self, rng):
        """Random initial parameters (for tests and the demo's tiny model; never used to load weights)."""
        rngs = {"params": rng, "dropout": jax.random.fold_in(rng, 1), "gaussian": jax.random.fold_in(rng, 2)}
        return self.init(rngs, *self.dummy_inputs())["params"]

    def save_pretrained(self, save_directory: str, params, variant: str | None = None) -> None:
        """Writes config.json and safetensors with PyTorch names and layouts (diffusers/transformers load it)."""
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, self.config_name), "w") as handle:
            json.dump(self.to_config(), handle, indent=2, sort_keys=True)
        host_params = jax.tree_util.tree_map(np.asarray, params)
        weights.save_params(save_directory, weights.variant_name(self.weights_name, variant), host_params)


def reject_unsupported(config: dict, supported: set[str], inert: dict, model: str) -> dict:
    """Checks config keys: returns {key: value} of supported keys. `inert` maps keys we accept only with a
    value that changes nothing (key -> allowed value or tuple of allowed values)."""
    kept = {}
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key in supported:
            kept[key] = value
        elif key in inert:
            allowed = inert[key] if isinstance(inert[key], tuple) else (inert[key],)
            if value not in allowed:
                raise ValueError(f"{model} config has {key}={value!r}, which t2i_flax does not support "
                                 f"(supported: {' or '.join(repr(a) for a in allowed)}); only SD 1.x/2.x models are")
        else:
            raise ValueError(f"{model} config key {key!r} (={value!r}) is not supported by t2i_flax; "
                             f"only SD 1.x/2.x models are")
    return kept
