"""The training command line with faults injected at the tensorstore/Orbax boundary (tests/test_restore_faults.py):
`python tests/fault_entry.py <train_text_to_image_flax.py's flags>`, set up by these environment variables.

T2I_FLAX_TEST_READ_FAULT=<CODE>:<count>[:<process>]
    The array reads (Orbax's `_read_shard`, where it reads tensorstore) of the first <count> restores that read
    arrays fail (-1: all of them) with tensorstore's error of status <CODE>, as a bucket's 503 reaches Orbax
    (which wraps it in its bare Exception); on process <process> only, where given.
T2I_FLAX_TEST_READ_DELAYS=1,2     checkpoint.READ_RETRY_DELAYS_S (seconds, comma-separated).
T2I_FLAX_TEST_ARM_URL=<url>       fetched once, before the first checkpoint read (arms the tests' failing proxy).
T2I_FLAX_TEST_GCSFS_BACKOFF=<f>   gcsfs's waits between its own tries of a request, times f (the test keeps its
                                  6 tries but not their half minute of waiting).

The patches go in once JAX is set up (devices, jax.distributed), where cli.main enables the compilation cache:
importing Orbax earlier would initialise JAX before --cpu_devices and --multihost take effect."""
import os
import sys
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from t2i_flax import cli, compile_cache  # noqa: E402  (neither imports JAX)


def install_faults() -> None:
    import jax
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.serialization import serialization

    from t2i_flax import checkpoint

    if os.environ.get("T2I_FLAX_TEST_READ_DELAYS"):
        checkpoint.READ_RETRY_DELAYS_S = tuple(float(x) for x in os.environ["T2I_FLAX_TEST_READ_DELAYS"].split(","))

    fault = os.environ.get("T2I_FLAX_TEST_READ_FAULT")
    if fault:
        code, count, *process = fault.split(":")
        count = int(count)
        if not process or int(process[0]) == jax.process_index():
            restores = {"started": 0, "reading_arrays": set()}
            manager_restore = ocp.CheckpointManager.restore

            def restore(self, *args, **kwargs):
                restores["started"] += 1
                return manager_restore(self, *args, **kwargs)

            async def read_shard(*args, t=None, **kwargs):
                restores["reading_arrays"].add(restores["started"])
                if count < 0 or len(restores["reading_arrays"]) <= count:
                    raise ValueError(f'{code}: Error reading "params.conv_in.kernel/0.0.0.0" in OCDBT database at '
                                     f'gcs "gs://bucket/run/checkpoints/4/params/": HTTP response code: 503 with body: '
                                     f'Service Unavailable [source locations=\'tensorstore/kvstore/gcs_http/'
                                     f'gcs_key_value_store.cc:657\']')
                return await original_read_shard(*args, t=t, **kwargs)

            original_read_shard = serialization._read_shard
            ocp.CheckpointManager.restore = restore
            serialization._read_shard = read_shard

    backoff = os.environ.get("T2I_FLAX_TEST_GCSFS_BACKOFF")
    if backoff:
        import asyncio
        import types

        import gcsfs.retry

        async def shorter_sleep(seconds):
            await asyncio.sleep(seconds * float(backoff))

        gcsfs.retry.asyncio = types.SimpleNamespace(sleep=shorter_sleep)  # retry.py's only use of asyncio

    arm_url = os.environ.get("T2I_FLAX_TEST_ARM_URL")
    if arm_url:
        read_run_record = checkpoint.Checkpoints.read_run_record

        def armed(self, step):
            if os.environ.pop("T2I_FLAX_TEST_ARM_URL", None):
                urllib.request.urlopen(arm_url).read()
            return read_run_record(self, step)

        checkpoint.Checkpoints.read_run_record = armed


def enable(directory):
    found = enable_cache(directory)
    install_faults()
    return found


enable_cache = compile_cache.enable
compile_cache.enable = enable

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
