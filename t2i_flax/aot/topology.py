"""The TPU topology to compile for (libtpu, no TPU needed) and the HBM per device its compiler lets a program use."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import tempfile

from t2i_flax import errors

LIBTPU_PIN = "libtpu==0.0.42.1"  # what jax[tpu]==0.10.2 pins (libtpu==0.0.42.*)


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str                 # what users rent: v3-8
    libtpu_name: str          # jax.experimental.topologies name
    options: dict             # libtpu topology options
    hbm_gib: float            # physical HBM per device (a v3 core; a v4 megacore chip; a v5e chip)
    usable_gib: float         # what the compiler reports as available per device (libtpu 0.0.42.1)
    what: str


# v4-8 is 4 chips of 2 cores that JAX sees as 4 megacore devices; v5e-8 is one host of 2x4 chips (libtpu's
# default would split "v5e:2x4" over two hosts of 4). Usable HBM: measured with libtpu 0.0.42.1 (the largest
# buffer the compiler accepts, bisected to 64 KiB: v3 15.482 GiB).
TOPOLOGIES = {
    "v3-8": Topology("v3-8", "v3:2x2", {}, 16.0, 15.48, "TPU v3-8: 4 chips, 8 cores of 16 GiB"),
    "v4-8": Topology("v4-8", "v4:2x2x1", {"chip_config_name": "megacore"}, 32.0, 30.75,
                     "TPU v4-8: 4 chips (megacore, 1 device each) of 32 GiB"),
    "v5e-8": Topology("v5e-8", "v5e:2x4", {"chips_per_host_bounds": [2, 4, 1]}, 16.0, 15.75,
                      "TPU v5e-8 (v5litepod-8): 8 chips of 16 GiB, one host"),
}
ALIASES = {"v5litepod-8": "v5e-8"}
USABLE_HBM_GIB = {t.libtpu_name.split(":")[0]: t.usable_gib for t in TOPOLOGIES.values()}


class NeedsLibtpu(errors.UserError):
    """libtpu (the TPU compiler) is not installed."""


def resolve_topology(name: str) -> Topology:
    name = ALIASES.get(name, name)
    if name in TOPOLOGIES:
        return TOPOLOGIES[name]
    if re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)*", name):  # a raw libtpu name, e.g. v3:4x4
        generation = name.split(":")[0]
        usable = USABLE_HBM_GIB.get(generation)
        return Topology(name, name, {}, usable or 0.0, usable or 0.0, f"libtpu topology {name}")
    raise errors.FlagError(f"--topology {name!r} is not one of: {', '.join(TOPOLOGIES)} "
                           f"(or a libtpu topology name such as v3:4x4)")


@contextlib.contextmanager
def _captured_stderr(captured: list):
    """libtpu's start-up writes warnings about the missing TPU straight to fd 2: capture them (into
    `captured`), so that the caller shows them only if something unexpected fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as handle:
        os.dup2(handle.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            handle.seek(0)
            captured.append(handle.read().decode(errors="replace"))


def topology_devices(topology: Topology):
    from jax.experimental import topologies

    captured: list[str] = []
    try:
        with _captured_stderr(captured):
            return topologies.get_topology_desc(platform="tpu", topology_name=topology.libtpu_name,
                                                **topology.options).devices
    except Exception as error:  # noqa: BLE001  (libtpu's INVALID_ARGUMENT for a topology it refuses)
        if "TPU support not installed" in str(error):
            raise NeedsLibtpu(f"t2i_flax.aot needs libtpu, the TPU compiler (no TPU): "
                              f"pip install {LIBTPU_PIN}") from None
        if "INVALID_ARGUMENT" in str(error):
            raise errors.FlagError(f"--topology {topology.name}: libtpu refuses it "
                                   f"({errors.one_line(error)[:200]})") from None
        sys.stderr.write("".join(captured))
        raise


def _compiles(devices, size: int) -> str | None:
    """None if a program whose output is `size` bytes per device compiles, else the compiler's message."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    where = NamedSharding(Mesh(np.asarray(devices), ("all",)), P())
    try:
        jax.jit(lambda: jnp.zeros((size,), jnp.uint8), out_shardings=where).lower().compile()
        return None
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return str(error)


def usable_hbm(devices, topology: Topology) -> tuple[int, str]:
    """(bytes per device the compiler lets one program use, "compiler" | "table"): the compiler's
    'available HBM (15.48G)' of an over-large program, refined by bisection to 1 MiB."""
    message = _compiles(devices, 2**40)
    found = re.search(r"available HBM \(([\d.]+)G\)", message or "")
    if not found:
        if topology.usable_gib:
            return int(topology.usable_gib * 2**30), "table"
        raise errors.FlagError(f"--topology {topology.name}: cannot tell its usable HBM")
    reported = float(found.group(1))
    low, high = int((reported - 0.01) * 2**30), int((reported + 0.01) * 2**30)
    if _compiles(devices, low) is not None or _compiles(devices, high) is None:
        return int(reported * 2**30), "compiler"
    while high - low > 2**20:
        middle = (low + high) // 2
        if _compiles(devices, middle) is None:
            low = middle
        else:
            high = middle
    return low, "compiler"
