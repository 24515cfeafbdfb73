"""`from_pretrained` / `save_pretrained` and the config handling shared by our Flax models (the API of the
removed diffusers/transformers Flax classes): `Model.from_pretrained(path_or_repo_id, subfolder=...) -> (module, params)`.

A model class provides `dummy_inputs()`, optionally `dummy_kwargs()` and `validate()`, and the class attributes
`weights_name`, `legacy_weights_name`, `config_name`, `model_name` (in error messages), `config_off`,
`config_ignored` and `config_extra` (see `PretrainedMixin`); its dataclass fields (but `dtype`, `attention`)
are its config keys."""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Collection, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t2i_flax import hub, weights
from t2i_flax.errors import ModelError


def _tuple(value):
    """JSON lists -> tuples (hashable module fields); nested lists too; scalars unchanged."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuple(v) for v in value)
    return value


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def check_config(model: str, config: dict, supported: Sequence[str], off: Mapping[str, Any] | None = None,
                 ignored: Collection[str] = frozenset()) -> dict:
    """Split a config dict into constructor kwargs; raise ModelError (naming key and value) on anything unsupported.

    ``supported``: keys that become module fields. ``off``: key -> predicate(value), or the tuple of values
    that mean "feature off / default" (accepted, not stored). ``ignored``: keys without effect on the
    network, whatever their value. Keys starting with ``_`` (``_class_name``, ``_name_or_path``...) are skipped.
    """
    off = off or {}
    kwargs = {}
    for key, value in config.items():
        if key.startswith("_") or key in ignored:
            continue
        if key in supported:
            kwargs[key] = value
        elif key in off:
            allowed = off[key]
            if callable(allowed) and not allowed(value):
                raise ModelError(f"{model} config {key}={value!r} is not supported by t2i_flax; "
                                 "t2i_flax trains SD 1.x/2.x and SDXL models")
            if not callable(allowed) and value not in allowed:
                raise ModelError(f"{model} config {key}={value!r} is not supported by t2i_flax (supported: "
                                 f"{' or '.join(repr(a) for a in allowed)}); t2i_flax trains SD 1.x/2.x and SDXL "
                                 f"models")
        else:
            raise ModelError(f"{model} config has unknown key {key!r} (value {value!r}); it is not supported by "
                             "t2i_flax; t2i_flax trains SD 1.x/2.x and SDXL models")
    return kwargs


_ABSTRACT_PARAMS: dict = {}  # (class, config) -> the parameter tree's ShapeDtypeStructs


class PretrainedMixin:
    weights_name: str
    legacy_weights_name: str
    config_name: str = "config.json"
    model_name: str  # in error messages (and diffusers' `_class_name`)
    config_off: Mapping[str, Any] = {}  # keys accepted with their "off" values only (see check_config)
    config_ignored: Collection[str] = frozenset()  # keys accepted with any value, without effect
    config_extra: Mapping[str, Any] = {}  # what to_config writes besides the fields

    # ------------------------------------------------------------------ config
    @classmethod
    def config_keys(cls) -> tuple[str, ...]:
        return tuple(f for f in cls.__dataclass_fields__ if f not in ("dtype", "attention", "parent", "name"))

    @classmethod
    def from_config(cls, config: dict, dtype=jnp.float32, attention: str | None = None):
        """Build from a diffusers/transformers config dict; ValueError naming any key or value we cannot honour."""
        kwargs = check_config(cls.model_name, config, cls.config_keys(), cls.config_off, cls.config_ignored)
        module = cls(**cls.normalize_config({k: _tuple(v) for k, v in kwargs.items()}), dtype=dtype,
                     attention=attention)
        module.validate()
        return module

    @classmethod
    def normalize_config(cls, kwargs: dict) -> dict:
        """Hook: rewrite accepted config values into field values."""
        return kwargs

    def validate(self) -> None:
        """Hook: raise ModelError for config values this implementation cannot run."""

    def to_config(self) -> dict:
        """config.json content that rebuilds this network in diffusers/transformers."""
        config = {key: _jsonable(getattr(self, key)) for key in self.config_keys()}
        config.update(copy.deepcopy(self.config_extra))
        return config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None,
                        revision: str | None = None, variant: str | None = None, dtype=jnp.float32,
                        cache_dir: str | None = None, attention: str | None = None, param_dtype=np.float32,
                        local_files_only: bool | None = None, load_weights: bool = True):
        """Returns (module, params); params are host numpy arrays in `param_dtype` (float32 default),
        `dtype` is the computation dtype. `load_weights=False`: (module, None), from the config alone."""
        folder = hub.resolve_model_dir(pretrained_model_name_or_path, subfolder, revision, variant, cache_dir,
                                       local_files_only)
        config_path = os.path.join(folder, cls.config_name)
        if not os.path.isfile(config_path):
            raise hub.ModelNotFoundError(f"{folder} has no {cls.config_name}")
        try:
            with open(config_path) as handle:
                config = json.load(handle)
        except (OSError, ValueError) as error:
            raise ModelError(f"cannot read {config_path}: {error}") from None
        module = cls.from_config(config, dtype=dtype, attention=attention)
        if not load_weights:
            return module, None
        params = weights.load_params(folder, cls.weights_name, cls.legacy_weights_name, module.abstract_params(),
                                     variant=variant, dtype=param_dtype)
        return module, params

    def abstract_params(self):
        """The parameter tree as ShapeDtypeStructs, without materialising any weights. Tracing the init costs
        about 0.3 s even for a tiny model and a run asks for it several times: kept per configuration (the
        parameters' shapes and dtypes do not depend on the compute dtype or attention)."""
        key = (type(self).__qualname__, json.dumps(self.to_config(), sort_keys=True))
        if key not in _ABSTRACT_PARAMS:
            _ABSTRACT_PARAMS[key] = jax.eval_shape(self.init_params, jax.random.key(0))
        return jax.tree_util.tree_map(lambda leaf: leaf, _ABSTRACT_PARAMS[key])  # a tree of its own to the caller

    def init_params(self, rng):
        """Random initial parameters (for tests and the demo's tiny model; never used to load weights)."""
        rngs = {"params": rng, "dropout": jax.random.fold_in(rng, 1), "gaussian": jax.random.fold_in(rng, 2)}
        return self.init(rngs, *self.dummy_inputs(), **self.dummy_kwargs())["params"]

    def dummy_kwargs(self) -> dict:
        """Hook: keyword arguments of ``__call__`` that ``init`` needs besides ``dummy_inputs()``."""
        return {}

    def save_pretrained(self, save_directory: str, params, variant: str | None = None) -> None:
        """Writes config.json and safetensors with PyTorch names and layouts (diffusers/transformers load it)."""
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, self.config_name), "w") as handle:
            json.dump(self.to_config(), handle, indent=2, sort_keys=True)
        host_params = jax.tree_util.tree_map(np.asarray, params)
        weights.save_params(save_directory, weights.variant_name(self.weights_name, variant), host_params)
