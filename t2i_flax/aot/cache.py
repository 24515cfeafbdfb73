"""What aot measured of a compiled program, kept on disk: the same flags again answer without compiling.

JAX's persistent compilation cache keeps programs for the devices of the host; aot compiles for a TPU topology
the host does not have, which JAX never caches, and a compile is minutes for a real model. aot only needs a few
numbers of the compiled program (its memory, FLOPs, argument layouts, or the compiler's out-of-memory lines):
those are kept as one small JSON file per program, in `aot_reports/` of the compilation cache folder (the
trainer's --compilation_cache_dir; `none`: no cache). The key is the lowered program's text (its shapes,
shardings, donation and every constant), the topology, and the versions of jax, jaxlib and libtpu and the
compiler flags in the environment: anything that can change what the compiler answers."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

FORMAT = 1  # bump when what is stored changes
FOLDER = "aot_reports"
COMPILER_ENVIRONMENT = ("XLA_FLAGS", "LIBTPU_INIT_ARGS")


class MeasureCache:
    """{key: measured dict} in `directory` (None: nothing is kept, every program compiles)."""

    def __init__(self, directory: str | None, topology_key: str):
        self.directory = os.path.join(directory, FOLDER) if directory else None
        self.topology_key = topology_key

    def key(self, program_text: str) -> str:
        import jax
        import jaxlib

        digest = hashlib.sha256()
        for part in (str(FORMAT), self.topology_key, jax.__version__, jaxlib.__version__,
                     *(os.environ.get(name, "") for name in COMPILER_ENVIRONMENT), program_text):
            digest.update(part.encode())
            digest.update(b"\0")
        return digest.hexdigest()

    def get(self, key: str) -> dict | None:
        if self.directory is None:
            return None
        try:
            with open(os.path.join(self.directory, f"{key}.json")) as handle:
                return json.load(handle)
        except (OSError, ValueError):  # absent, or a partial file of an older version: compile again
            return None

    def put(self, key: str, measured: dict) -> None:
        """Written whole or not at all (a temporary file renamed); a folder that cannot be written keeps nothing."""
        if self.directory is None:
            return
        try:
            os.makedirs(self.directory, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            with os.fdopen(handle, "w") as out:
                json.dump(measured, out)
            os.replace(temporary, os.path.join(self.directory, f"{key}.json"))
        except OSError:
            pass
