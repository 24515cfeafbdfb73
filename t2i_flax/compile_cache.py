"""JAX's persistent compilation cache, on by default for training, validation sampling and `generate`.

A resumed run (after a preemption, say) or a second run of the same configuration loads its compiled
programs from disk instead of compiling them again. `--compilation_cache_dir`: the folder (default
`$T2I_FLAX_COMPILATION_CACHE`, else `$XDG_CACHE_HOME/t2i_flax/jax_compilation_cache`, else
`~/.cache/t2i_flax/jax_compilation_cache`); `none` turns it off. Call before the first compile."""
from __future__ import annotations

import os

from t2i_flax.errors import FlagError

ENVIRONMENT = "T2I_FLAX_COMPILATION_CACHE"
OFF = "none"


def default_dir() -> str:
    if os.environ.get(ENVIRONMENT):
        return os.environ[ENVIRONMENT]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "t2i_flax", "jax_compilation_cache")


def enable(directory: str | None) -> str | None:
    """Points JAX at the cache folder (None: the default) and returns it; None when turned off."""
    import jax

    if directory == OFF:
        return None
    directory = directory or default_dir()
    if "://" not in directory:
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as error:
            raise FlagError(f"--compilation_cache_dir {directory}: {error.strerror or error}; give another folder "
                            f"or 'none'") from None
    jax.config.update("jax_compilation_cache_dir", directory)
    # Every program of the run is worth keeping: even the tiny ones compile for seconds on a CPU host.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
