"""--checkpoints_dir gs://bucket/path: Orbax checkpoints in a Google Cloud Storage bucket, against a local GCS
emulator (gcp-storage-emulator's request handlers and in-memory storage, served on 127.0.0.1 from this process;
nothing leaves the machine).

Orbax reaches a bucket three ways, each pointed at the emulator by environment variables (`emulator_environment`):
tensorstore's gcs driver writes and reads the arrays, etils.epath -> fsspec -> gcsfs handles the folders and the
JSON items, and google-cloud-storage answers Orbax's question whether the bucket has a hierarchical namespace. In
a bucket Orbax writes a step folder in place and marks it complete with a `commit_success.txt` (no renames).

gcp-storage-emulator 2026.7.19 lacks what real GCS has and tensorstore relies on; `_gcs_routes` and the server
here add it: generation preconditions (ifGenerationMatch / ifGenerationNotMatch: tensorstore's OCDBT revalidates
what it has cached with them; without them a second read fails with "Malformed StorageGeneration"), the
x-goog-generation header of a download, an accept queue longer than http.server's 5 (tensorstore opens up to 32
connections at once), one thread per connection and `Expect: 100-continue` answered (HTTP/1.1). objects.move is
answered 400 ("not emulated"), so gcsfs falls back to copy + delete at once, as it does wherever that API fails
(the emulator's 501 would be retried for ~30 s).

Checkpoints are also a matter of tests/test_checkpoint.py; this file is what differs in a bucket."""
import functools
import http.server
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.request
from http import HTTPStatus

import jax
import numpy as np
import pytest
from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.storage import Storage
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from t2i_flax import checkpoint, optim, resume, step

checkpoint.setup_process()  # as the command lines do

from test_checkpoint import ROOT, UNET_FILE, environment, logged_steps, run_argv

BUCKET = "t2i-checkpoints"


def emulator_environment(url: str) -> dict:
    """What points each library at the emulator, with anonymous credentials."""
    return {
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore's gcs driver (the arrays), instead of storage.googleapis.com
        "STORAGE_EMULATOR_HOST": url,  # gcsfs, and google-cloud-storage (which then uses anonymous credentials)
        "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: anonymous, no credential lookup
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no gRPC storage-layout probe (60 s timeouts here)
        # tensorstore, finding no credentials file, asks the GCE metadata server, then goes on anonymously: the
        # server is a closed local port, so that fails at once and never reaches out.
        "GCE_METADATA_ROOT": "127.0.0.1:9",
        "NO_GCE_CHECK": "true",  # gcsfs/google-auth: no metadata server probe either
    }


# ---- the emulator ----------------------------------------------------------------------------------------------

def _with_preconditions(handler):
    """An emulator object handler with GCS's generation preconditions and download headers."""
    def handle(request, response, storage, *args, **kwargs):
        params = request.params or {}
        bucket = params.get("bucket_name")
        name = params.get("object_id") or (request.query.get("name") or [None])[0]
        media_read = request.method == "GET" and (request.query.get("alt") == ["media"]
                                                  or request.path.startswith("/download/"))
        if bucket is None or name is None or (request.method == "GET" and not media_read):
            return handler(request, response, storage, *args, **kwargs)
        try:
            current = storage.get_file_obj(bucket, name)
        except NotFound:
            current = None
        generation = current["generation"] if current else "0"  # GCS: generation 0 means "no such object"
        match, not_match = (request.query.get(key, [None])[0] for key in ("ifGenerationMatch", "ifGenerationNotMatch"))
        if match is not None and match != generation:
            response.status = HTTPStatus.PRECONDITION_FAILED
            return None
        if not_match is not None and not_match == generation:
            response.status = HTTPStatus.NOT_MODIFIED if media_read else HTTPStatus.PRECONDITION_FAILED
            return None
        result = handler(request, response, storage, *args, **kwargs)
        if media_read and current is not None and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            response["x-goog-generation"] = current["generation"]
            response["x-goog-metageneration"] = current["metageneration"]
        return result
    return handle


def _move_not_emulated(request, response, storage, *args, **kwargs):
    response.status = HTTPStatus.BAD_REQUEST
    response.json({"error": {"code": 400, "message": "objects.move is not emulated"}})


def _gcs_routes(routes):
    conditional = {"get", "download", "insert", "delete"}  # object reads, media uploads, deletes
    move = (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$",
            {"POST": _move_not_emulated})
    return (move,) + tuple((regex, {method: _with_preconditions(handler) if handler.__name__ in conditional else handler
                                    for method, handler in methods.items()}) for regex, methods in routes)


class _EmulatorServer(http.server.ThreadingHTTPServer):
    """One thread per connection (a client waiting for a 100 Continue, or stalled, holds up no one else); the
    emulator's storage is plain dicts, so the requests themselves take turns (`_RequestHandler`)."""
    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return  # a client that dropped its connection (tensorstore cancels reads it no longer needs)
        super().handle_error(request, client_address)


class _RequestHandler(emulator_server.RequestHandler):
    """HTTP/1.1, so that `Expect: 100-continue` (curl's, for larger uploads) is answered at once instead of after
    curl's 1 s timeout; one request per connection, as the emulator's handlers expect; the body is read before the
    request takes its turn."""
    protocol_version = "HTTP/1.1"
    turn = threading.Lock()

    def send_response(self, code, message=None):
        super().send_response(code, message)
        self.send_header("Connection", "close")

    def _route(self, method):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile = io.BytesIO(self.rfile.read(length))
        with self.turn:
            emulator_server.Router(self).handle(method)

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    def do_DELETE(self):
        self._route("DELETE")

    def do_PATCH(self):
        self._route("PATCH")


class Emulator:
    def __init__(self, url: str, storage: Storage):
        self.url, self.storage = url, storage

    def objects(self, prefix: str) -> dict:
        """{name below prefix: bytes} of the bucket, read from the emulator's storage (no client cache)."""
        names = sorted(name for name in list(self.storage.objects[BUCKET]) if name.startswith(prefix))
        return {name[len(prefix):]: self.storage.get_file(BUCKET, name) for name in names}


def _clear_client_caches():
    """Drops the clients that hold an endpoint (epath's and fsspec's gcsfs instances, Orbax's bucket objects)."""
    import gcsfs
    from etils.epath import backend
    from orbax.checkpoint._src.path import gcs_utils

    backend.fsspec_backend._get_filesystem.cache_clear()
    gcsfs.GCSFileSystem.clear_instance_cache()
    gcs_utils.get_bucket.cache_clear()


@pytest.fixture(scope="module")
def gcs():
    """The emulator on a free port with one bucket, and the environment pointing this process (and the training
    processes it starts, which inherit it) at it; all undone afterwards. tensorstore reads
    TENSORSTORE_GCS_HTTP_URL once per process, at its first gs:// access: nothing here used GCS before."""
    import fsspec

    storage = Storage(use_memory_fs=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(emulator_server, "HANDLERS", _gcs_routes(emulator_server.HANDLERS))
        patch.setattr(logging.getLogger("gcp_storage_emulator"), "level", logging.CRITICAL)  # it logs every 404
        httpd = _EmulatorServer(("127.0.0.1", 0), functools.partial(_RequestHandler, storage))
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        try:
            create = urllib.request.Request(f"{url}/storage/v1/b?project=test", method="POST",
                                            data=json.dumps({"name": BUCKET}).encode(),
                                            headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(create) as answer:
                assert json.load(answer)["name"] == BUCKET
            for name, value in emulator_environment(url).items():
                patch.setenv(name, value)
            patch.setitem(fsspec.config.conf, "gcs", {"token": "anon"})  # FSSPEC_GCS_TOKEN is read at fsspec's import
            import gcsfs  # after GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT, which gcsfs reads at its import
            assert gcsfs.GCSFileSystem is gcsfs.core.GCSFileSystem, "gcsfs was imported before this module's setup"
            _clear_client_caches()
            yield Emulator(url, storage)
        finally:
            _clear_client_caches()
            httpd.shutdown()
            httpd.server_close()
            thread.join()


# ---- in-process: Checkpoints in a bucket --------------------------------------------------------------------------

def small_state(offset: float):
    """A TrainState of a few arrays (float32 weights with real AdamW state, int32 counts, a uint32 key), its kernel
    sharded over the 8 devices; every float leaf shifted by `offset`, so that each step saves other values."""
    params = {"conv_in": {"kernel": np.arange(3 * 3 * 4 * 8, dtype=np.float32).reshape(3, 3, 4, 8) / 7,
                          "bias": np.linspace(-1, 1, 8, dtype=np.float32)},
              "norm": {"scale": np.full((8,), 0.5, np.float32)}}
    lr = optim.learning_rate_schedule("constant", 1e-3, 0, 10)
    state = step.TrainState(step=np.int32(offset), params=params, opt_state=optim.make_optimizer(lr).init(params),
                            ema_params=jax.tree_util.tree_map(lambda x: x * 2, params), rng=jax.random.PRNGKey(7))
    state = jax.tree_util.tree_map(lambda x: np.asarray(x) + offset if np.issubdtype(np.asarray(x).dtype, np.floating)
                                   else np.asarray(x), state)
    mesh = Mesh(np.array(jax.devices()), ("x",))
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, NamedSharding(
        mesh, PartitionSpec(None, None, None, "x") if x.shape == (3, 3, 4, 8) else PartitionSpec())), state)


def on_one_device(state):
    where = SingleDeviceSharding(jax.devices()[0])
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where), state)


def assert_same_arrays(restored, saved):
    saved_leaves = jax.tree_util.tree_leaves_with_path(saved)
    restored_leaves = jax.tree_util.tree_leaves(restored)
    assert len(saved_leaves) == len(restored_leaves) == 16
    for (path, want), got in zip(saved_leaves, restored_leaves):
        assert got.dtype == want.dtype and got.shape == want.shape, jax.tree_util.keystr(path)
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), jax.tree_util.keystr(path)


def test_checkpoints_in_a_bucket_round_trip_list_and_keep_the_newest(gcs):
    directory = f"gs://{BUCKET}/run/checkpoints"
    manager = checkpoint.Checkpoints(directory, keep=2)
    assert manager.directory == directory and manager.step_path(4) == f"{directory}/4"
    saved = {}
    for number, listed in ((2, [2]), (4, [2, 4]), (6, [4, 6])):
        saved[number] = small_state(number)
        manager.save(number, saved[number], {"next_batch": number, "epoch": number // 2}, {"version": 1, "at": number})
        manager.wait()
        assert manager.steps() == listed
    manager.close()

    names = gcs.objects("run/checkpoints/")
    assert sorted({name.split("/")[0] for name in names}) == ["4", "6"]  # step 2 deleted from the bucket
    for number in (4, 6):
        assert f"{number}/commit_success.txt" in names  # how Orbax marks a complete step in a bucket
        for item in ("params", "ema_params", "optimizer", "data", "run"):
            assert f"{number}/{item}/commit_success.txt" in names
    assert json.loads(names["6/data/metadata"]) == {"next_batch": 6, "epoch": 3}
    assert resume._has_steps(directory)

    reader = checkpoint.Checkpoints(directory, read_only=True)
    assert reader.steps() == [4, 6]
    for number in (4, 6):
        assert reader.read_run_record(number) == {"run": {"version": 1, "at": number},
                                                  "data": {"next_batch": number, "epoch": number // 2}}
        restored = reader.restore_state(number, on_one_device(saved[number]))
        assert_same_arrays(restored, saved[number])
        assert restored.params["conv_in"]["kernel"].sharding == SingleDeviceSharding(jax.devices()[0])
    reader.close()


def test_a_save_cut_short_in_a_bucket_is_no_step_and_is_removed(gcs):
    """A step folder without its commit file (what a killed save leaves in a bucket) does not count as a
    checkpoint (`--resume_from_checkpoint latest` then starts a new run); a run that writes there removes it."""
    directory = f"gs://{BUCKET}/cut/checkpoints"
    manager = checkpoint.Checkpoints(directory)
    manager.save(2, small_state(2), {"next_batch": 2}, {"version": 1})
    manager.close()
    for name, content in gcs.objects("cut/checkpoints/2/").items():
        if not name.endswith("commit_success.txt"):  # the same files, as a save that never got to commit
            (epath.Path(directory) / "3" / name).write_bytes(content)
    assert checkpoint.Checkpoints(directory, read_only=True).steps() == [2]
    assert resume._has_steps(directory)
    (epath.Path(directory) / "2" / "commit_success.txt").unlink()
    assert not resume._has_steps(directory)  # only unfinished step folders: no checkpoint
    assert sorted({name.split("/")[0] for name in gcs.objects("cut/checkpoints/")}) == ["2", "3"]
    # A writing run opens the directory (Orbax starts removing both in the background; the first save waits for
    # that) and writes step 2 again.
    again = checkpoint.Checkpoints(directory)
    assert again.steps() == []
    state = small_state(5)
    again.save(2, state, {"next_batch": 2}, {"version": 2})
    again.close()
    names = gcs.objects("cut/checkpoints/")
    assert sorted({name.split("/")[0] for name in names}) == ["2"] and "2/commit_success.txt" in names
    reader = checkpoint.Checkpoints(directory, read_only=True)
    assert reader.steps() == [2] and reader.read_run_record(2)["run"] == {"version": 2}
    assert_same_arrays(reader.restore_state(2, on_one_device(state)), state)


def test_a_damaged_step_in_a_bucket_is_skipped_and_set_aside(gcs):
    """`latest` falls back from a step whose array files are truncated to the newest good one, and
    `set_aside` renames the damaged step (gcsfs copies and deletes each object: not atomic, but a step without
    all its objects is still no step), after which the run can write that step again."""
    directory = f"gs://{BUCKET}/damaged/checkpoints"
    manager = checkpoint.Checkpoints(directory)
    saved = {number: small_state(number) for number in (4, 6)}
    for number, state in saved.items():
        manager.save(number, state, {"next_batch": number}, {"version": 1})
    manager.close()
    before = gcs.objects("damaged/checkpoints/6/")
    data_files = [name for name in before if name.startswith("params/") and "/d/" in f"/{name}"]
    assert data_files
    for name in data_files:
        (epath.Path(directory) / "6" / name).write_bytes(before[name][: len(before[name]) // 2])
    damaged_objects = {**before, **{name: before[name][: len(before[name]) // 2] for name in data_files}}
    assert gcs.objects("damaged/checkpoints/6/") == damaged_objects

    reader = checkpoint.Checkpoints(directory, read_only=True)
    resumed, state, data_state, record, damaged = resume.restore(reader, None, "latest", lambda record: None,
                                                                    on_one_device(saved[4]))
    reader.close()
    assert (resumed, damaged, data_state, record) == (4, [6], {"next_batch": 4}, {"version": 1})
    assert_same_arrays(state, saved[4])

    assert resume.set_aside(directory, damaged) == [f"{directory}/6.damaged"]
    assert gcs.objects("damaged/checkpoints/6.damaged/") == damaged_objects
    assert gcs.objects("damaged/checkpoints/6/") == {}
    again = checkpoint.Checkpoints(directory)
    assert again.steps() == [4]
    again.save(6, saved[6], {"next_batch": 6}, {"version": 1})
    again.close()
    reread = checkpoint.Checkpoints(directory, read_only=True)
    assert reread.steps() == [4, 6]
    assert_same_arrays(reread.restore_state(6, on_one_device(saved[6])), saved[6])


# ---- the command line: train, resume and export with the checkpoints in a bucket ---------------------------------

def test_training_with_checkpoints_in_a_bucket_resumes_bit_identically(gcs, pipeline_dir, dataset_dir, tmp_path):
    """4 steps with --checkpoints_dir gs://..., then `--resume_from_checkpoint latest` to 6: the export equals an
    uninterrupted 6-step run's bit for bit (EMA, random flips, data order), the keep limit deletes step 2 from the
    bucket, and `python -m t2i_flax.export` writes step 4's pipeline from the bucket. The learning rate is constant
    after its 2 warmup steps, so training longer does not change the steps before. No dataloader workers: the
    position with workers is tests/test_checkpoint.py's matter, not the bucket's."""
    bucket_dir = f"gs://{BUCKET}/cli/checkpoints"
    settings = ("--lr_scheduler", "constant_with_warmup", "--dataloader_num_workers", "0", "--max_train_steps")
    in_bucket = ("--checkpoints_dir", bucket_dir, "--checkpoints_total_limit", "2")
    reference_dir, output_dir = str(tmp_path / "reference"), str(tmp_path / "out")
    started = []

    def start(name, argv):
        """A process whose output goes to a file (a process blocked on a full pipe would also block its requests)."""
        with open(tmp_path / f"{name}.log", "w") as log:
            started.append(subprocess.Popen(argv, env=environment(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        started[-1].log = tmp_path / f"{name}.log"
        return started[-1]

    def finish(process):
        returncode = process.wait(timeout=600)
        output = process.log.read_text()
        assert returncode == 0, output[-3000:]
        return output

    try:
        reference = start("reference", run_argv(pipeline_dir, dataset_dir, reference_dir, *settings, "6"))
        # The run in the bucket starts once the reference has compiled the (same) step: it then reads it from JAX's
        # compilation cache instead of compiling it at the same time on the same 2 cores.
        deadline = time.monotonic() + 600
        while "compiled the train step" not in reference.log.read_text():
            assert reference.poll() is None and time.monotonic() < deadline, reference.log.read_text()[-3000:]
            time.sleep(0.1)
        first = start("first", run_argv(pipeline_dir, dataset_dir, output_dir, *settings, "4", *in_bucket))
        finish(reference)
        output = finish(first)
        assert f"checkpoint {bucket_dir}/2 " in output and f"checkpoint {bucket_dir}/4 " in output
        assert not os.path.exists(os.path.join(output_dir, "checkpoints"))  # nothing written beside the output
        assert sorted({name.split("/")[0] for name in gcs.objects("cli/checkpoints/")}) == ["2", "4"]
        with open(os.path.join(output_dir, UNET_FILE), "rb") as handle:
            unet_at_4 = handle.read()

        resumed = start("resumed", run_argv(pipeline_dir, dataset_dir, output_dir, *settings, "6", *in_bucket,
                                            "--resume_from_checkpoint", "latest"))
        exported = start("export", [sys.executable, "-m", "t2i_flax.export", "--checkpoint", f"{bucket_dir}/4",
                                    "--output_dir", str(tmp_path / "export4")])  # while training goes on
        assert f"resumed from {bucket_dir}/4 (step 4 of 6)" in finish(resumed)
        assert f"exported the EMA weights of {bucket_dir}/4 to " in finish(exported)
    finally:
        for process in started:  # none left behind by a failure
            if process.poll() is None:
                process.kill()
                process.wait()

    with open(os.path.join(reference_dir, UNET_FILE), "rb") as a, open(os.path.join(output_dir, UNET_FILE), "rb") as b:
        assert a.read() == b.read()
    losses = {entry["step"]: entry["loss"] for entry in logged_steps(output_dir)}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses == {entry["step"]: entry["loss"] for entry in logged_steps(reference_dir)}
    assert sorted({name.split("/")[0] for name in gcs.objects("cli/checkpoints/")}) == ["4", "6"]  # the newest 2
    assert sorted(os.listdir(os.path.join(reference_dir, "checkpoints"))) == ["2", "4", "6"]
    with open(tmp_path / "export4" / UNET_FILE, "rb") as handle:
        assert handle.read() == unet_at_4  # the checkpoint's export equals the end of the 4-step run


# ---- JAX's persistent compilation cache in a bucket ---------------------------------------------------------------

COMPILE_IN_A_FRESH_PROCESS = """
import collections, sys
import jax, jax.numpy as jnp
from t2i_flax import compile_cache
events = collections.Counter()
jax.monitoring.register_event_listener(lambda name, **metadata: events.update([name]))
compile_cache.enable(sys.argv[1])
x = jnp.arange(64.0).reshape(8, 8) / 64
print(repr(float(jax.jit(lambda x: (jnp.sin(x) @ x.T + 1).sum())(x))))
print(events["/jax/compilation_cache/cache_hits"], events["/jax/compilation_cache/cache_misses"])
"""


def test_the_compilation_cache_in_a_bucket_is_written_and_read_by_the_next_process(gcs):
    """--compilation_cache_dir gs://...: a compile in one process writes its entry to the bucket (through etils.epath
    and gcsfs, as JAX does for a path that is not local), and a second process loads it (a cache hit, no compile)."""
    directory = f"gs://{BUCKET}/jax_cache"
    runs = []
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", COMPILE_IN_A_FRESH_PROCESS, directory], cwd=ROOT,
                                env={**environment(), "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        value, counts = result.stdout.split("\n")[:2]
        runs.append((value, tuple(map(int, counts.split())), gcs.objects("jax_cache/")))
    (first_value, first_counts, first_objects), (second_value, second_counts, second_objects) = runs
    # (hits, misses = entries written): every program of the first (the jitted function, and arange, reshape and
    # the division run eagerly) is written, and every one is a hit in the second.
    programs = first_counts[1]
    assert programs >= 2 and first_counts == (0, programs) and second_counts == (programs, 0)
    entries = [name for name in first_objects if name.endswith("-cache")]
    assert len(entries) == programs and min(len(first_objects[name]) for name in entries) > 1000  # executables
    assert second_objects == first_objects and second_value == first_value
