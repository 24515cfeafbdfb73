"""Device mesh, the one table that decides where every array lives, and host-local -> global arrays.

Mesh axes: ("data", "fsdp"). The batch is split over both axes (every device gets its own examples).
Parameters, gradients, optimizer and EMA state are replicated over "data" and, when the fsdp axis has
more than one device, sharded along it by the rules below."""
from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from t2i_flax.errors import FlagError

BATCH_AXES = ("data", "fsdp")

# (regex on the "/"-joined path of a leaf, {ndim: PartitionSpec}); first match wins; no entry -> replicated.
# Kernels are split along their output features, embeddings along the vocabulary. Biases and norm
# scales are small and stay replicated. Applies to params, grads, Adam moments and EMA alike, since
# their paths all end with the parameter's path.
PARTITION_RULES = (
    (r"(^|/)kernel$", {4: P(None, None, None, "fsdp"), 2: P(None, "fsdp")}),
    (r"(^|/)embedding$", {2: P("fsdp", None)}),
)


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """All devices; `fsdp` of them along the "fsdp" axis, the rest along "data"."""
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise FlagError(f"--fsdp {fsdp} must divide the device count {len(devices)}")
    grid = np.asarray(devices).reshape(len(devices) // fsdp, fsdp)
    return Mesh(grid, BATCH_AXES)


def _path_string(path) -> str:
    names = []
    for entry in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(entry, attribute):
                names.append(str(getattr(entry, attribute)))
                break
    return "/".join(names)


def partition_spec(path: str, shape, fsdp_size: int) -> P:
    if fsdp_size == 1:
        return P()
    for pattern, specs in PARTITION_RULES:
        if re.search(pattern, path):
            spec = specs.get(len(shape))
            if spec is None:
                return P()
            # A dimension that does not divide evenly stays whole.
            for dim, axis in enumerate(spec):
                if axis is not None and shape[dim] % fsdp_size:
                    return P()
            return spec
    return P()


def tree_shardings(mesh: Mesh, tree):
    """NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs) by PARTITION_RULES."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, partition_spec(_path_string(path), np.shape(leaf), fsdp_size)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(mesh: Mesh, host_batch: dict) -> dict:
    """Host-local numpy batch -> global jax.Arrays split along the batch dimension over all devices."""
    sharding = batch_sharding(mesh)
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for name, value in host_batch.items()}


def gather_to_host(tree):
    """The whole of every array of `tree` as numpy on every host, also where it is sharded over several hosts (FSDP).
    One program for the whole tree (multihost_utils.process_allgather compiles one per distinct leaf shape: ~70 for
    the tiny UNet, hundreds for SD's, each a compile and a cache entry on every host); one host: a plain copy."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    replicated = jax.tree_util.tree_map(lambda leaf: NamedSharding(leaf.sharding.mesh, P()), tree)
    whole = jax.jit(lambda values: values, out_shardings=replicated)(tree)
    return jax.tree_util.tree_map(lambda leaf: np.asarray(leaf.addressable_data(0)), whole)


def put(tree, shardings):
    """jax.device_put of host values (numpy) onto `shardings`; on several hosts each host places its own shards from
    its copy (the same files on every host), where device_put would first gather every array from every host to check
    that the copies are equal (a program per distinct shape and, for SD's weights, gigabytes between the hosts)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def place(value, where):
        if isinstance(value, jax.Array):
            return jax.device_put(value, where)
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, where, lambda index: value[index])

    return jax.tree_util.tree_map(place, tree, shardings)
