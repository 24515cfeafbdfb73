"""Restore errors that never eat progress: only files that prove damage make `latest` fall back (and the step set
aside); any other failure (a bucket's 503, a host out of memory) is retried and then stops the run with one line
and exit code 1, nothing renamed or deleted; with two processes, one host that cannot read stops both.

Faults come three ways: a local HTTP proxy in front of the GCS emulator that answers 503 (the real storage clients'
own retries included), tensorstore's error raised where Orbax reads an array (tests/fault_entry.py, in the
training process), and a truncated file."""
import glob
import hashlib
import http.client
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
from etils import epath

from t2i_flax import checkpoint

from test_checkpoint import ROOT, UNET_FILE, environment, last_line, logged_steps, run_argv
from test_checkpoint_gcs import BUCKET, emulator_environment, gcs  # noqa: F401  (gcs: the emulator fixture)

ENTRY = os.path.join(ROOT, "tests", "fault_entry.py")
STEPS = 4  # checkpoints of steps 2 and 4
DELAYS = "0.5,1,2"  # our retries' waits in the training processes (READ_ATTEMPTS stays 4)


def argv(pipeline_dir, dataset_dir, output_dir, *extra, entry=None):
    """test_checkpoint.py's run, 4 steps, with test_checkpoint_gcs.py's schedule (constant after its warmup, so the
    step is the same program as there, compiled once) and no dataloader workers (their position is
    test_checkpoint.py's matter; each would start another Python)."""
    command = run_argv(pipeline_dir, dataset_dir, output_dir, "--lr_scheduler", "constant_with_warmup",
                       "--dataloader_num_workers", "0", *extra)
    command[command.index("--max_train_steps") + 1] = str(STEPS)
    if entry:
        command[1] = entry
    return command


def run(command, timeout=900, **env):
    start = time.monotonic()
    result = subprocess.run(command, env={**environment(), **env}, cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout)
    result.seconds = time.monotonic() - start
    return result


def unet_bytes(output_dir):
    with open(os.path.join(output_dir, UNET_FILE), "rb") as handle:
        return handle.read()


def digest(folder):
    """{relative path: sha256} of every file below `folder`: what was renamed, deleted or changed shows."""
    return {os.path.relpath(path, folder): hashlib.sha256(open(path, "rb").read()).hexdigest()
            for path in glob.glob(os.path.join(folder, "**"), recursive=True) if os.path.isfile(path)}


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def trained(pipeline_dir, dataset_dir, tmp_path_factory):
    """4 steps on 8 devices, checkpoints of steps 2 and 4 (EMA, random flips)."""
    output_dir = str(tmp_path_factory.mktemp("trained"))
    result = run(argv(pipeline_dir, dataset_dir, output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(output_dir, "checkpoints"))) == ["2", "4"]
    return output_dir


@pytest.fixture
def copy(trained, tmp_path):
    output_dir = str(tmp_path / "copy")
    shutil.copytree(trained, output_dir)
    return output_dir


# ---- what counts as damage --------------------------------------------------------------------------------------

def orbax_read_error(cause: BaseException) -> Exception:
    """What Orbax raises for a failed array read: its bare Exception, the tensorstore error as the cause."""
    try:
        try:
            raise cause
        except BaseException as error:
            raise Exception("Encountered error while reading array index: (slice(0, 8, 1),). See full TensorStore "
                            "details: {...}.") from error
    except Exception as wrapped:
        return wrapped


@pytest.mark.parametrize("cause,kind", [
    (ValueError('OUT_OF_RANGE: Error reading "w/0.0" in OCDBT database at local file "/c/4/params/": Requested byte '
                'range [0, 704377) is not valid for value of size 352301'), checkpoint.DAMAGE),
    (ValueError('UNAVAILABLE: Error reading "w/0.0" in OCDBT database at gcs "gs://b/c/4/params/": HTTP response '
                'code: 503 with body: Service Unavailable'), checkpoint.STORAGE),
    (ValueError('DATA_LOSS: Error reading "w/.zarray": Error decoding local file "/c/4/params/manifest.ocdbt"'),
     checkpoint.DAMAGE),
    (ValueError('FAILED_PRECONDITION: Error reading "w/0.0": Truncated Zstd-compressed stream; at byte 0'),
     checkpoint.DAMAGE),
    (ValueError('DEADLINE_EXCEEDED: Error reading "w/0.0" in OCDBT database at gcs "gs://b/c/4/params/"'),
     checkpoint.STORAGE),
    (ValueError('RESOURCE_EXHAUSTED: Error reading "w/0.0": out of memory'), checkpoint.STORAGE),
    (MemoryError(), checkpoint.STORAGE),
    (ConnectionResetError(104, "Connection reset by peer"), checkpoint.STORAGE),
    (TypeError("unsupported operand"), None),  # neither: a bug, re-raised with its traceback
])
def test_damage_is_told_by_the_cause_of_orbax_bare_exception(cause, kind):
    found, why = checkpoint.classify_read_error(orbax_read_error(cause))
    assert found == kind
    if kind is not None:
        assert why is cause


@pytest.mark.parametrize("error,kind", [
    (FileNotFoundError("File /c/4/run/metadata not found."), checkpoint.DAMAGE),
    (json.JSONDecodeError("Expecting value", "{garbage", 1), checkpoint.DAMAGE),
    (KeyError('Item "ema_params" was not found in the checkpoint. Available items: [params]'), checkpoint.DAMAGE),
    (ValueError("Requested shape: (8, 9) is not compatible with the stored shape: (8, 8)."), checkpoint.DAMAGE),
    (MemoryError(), checkpoint.STORAGE),
    (PermissionError(13, "Permission denied"), checkpoint.STORAGE),
    (KeyError("params"), None),
    (ValueError("some other value error"), None),
])
def test_damage_of_metadata_and_json_items(error, kind):
    assert checkpoint.classify_read_error(error)[0] == kind


# ---- the training process, faults injected at the tensorstore/Orbax boundary -------------------------------------

def test_unavailable_twice_is_retried_then_resumes_the_newest(copy, trained, pipeline_dir, dataset_dir):
    """The array reads of the first two restores fail as a bucket's 503 reaches Orbax: attempts 2 and 3 are
    announced, the third succeeds, step 4 (the newest) is resumed; nothing is renamed and the export equals the
    uninterrupted run's bit for bit."""
    checkpoints_dir = os.path.join(copy, "checkpoints")
    before = digest(checkpoints_dir)
    result = run(argv(pipeline_dir, dataset_dir, copy, "--resume_from_checkpoint", "latest", entry=ENTRY),
                 T2I_FLAX_TEST_READ_FAULT="UNAVAILABLE:2", T2I_FLAX_TEST_READ_DELAYS=DELAYS)
    assert result.returncode == 0, result.stderr[-3000:]
    retries = [line for line in result.stderr.splitlines() if line.startswith("reading checkpoint ")]
    assert retries == [f"reading checkpoint {checkpoints_dir}/4 failed (UNAVAILABLE: Error reading "
                       f"\"params.conv_in.kernel/0.0.0.0\" in OCDBT database at gcs \"gs://bucket/run/checkpoints/4/"
                       f"params/\": HTTP response code: 503 with body: Service Unavailable); attempt {n} of 4 in {s} s"
                       for n, s in ((2, "0.5"), (3, "1"))], result.stderr[-3000:]
    assert f"resumed from {checkpoints_dir}/4 (step 4 of 4)" in result.stdout
    assert "falling back" not in result.stderr and "Traceback" not in result.stderr
    assert digest(checkpoints_dir) == before
    assert unet_bytes(copy) == unet_bytes(trained)


def test_unavailable_for_good_stops_with_one_line_and_renames_nothing(copy, pipeline_dir, dataset_dir):
    checkpoints_dir = os.path.join(copy, "checkpoints")
    before = digest(checkpoints_dir)
    os.remove(os.path.join(copy, UNET_FILE))
    result = run(argv(pipeline_dir, dataset_dir, copy, "--resume_from_checkpoint", "latest", entry=ENTRY),
                 T2I_FLAX_TEST_READ_FAULT="UNAVAILABLE:-1", T2I_FLAX_TEST_READ_DELAYS=DELAYS)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert error_lines(result.stderr) == [last_line(result.stderr)] == [
        f"error: reading checkpoint {checkpoints_dir}/4 failed 4 times (UNAVAILABLE: Error reading "
        f"\"params.conv_in.kernel/0.0.0.0\" in OCDBT database at gcs \"gs://bucket/run/checkpoints/4/params/\": HTTP "
        f"response code: 503 with body: Service Unavailable); nothing was renamed or deleted: run again when the "
        f"storage answers"]
    assert [line.rsplit("attempt ", 1)[1] for line in result.stderr.splitlines()
            if line.startswith("reading checkpoint ")] == ["2 of 4 in 0.5 s", "3 of 4 in 1 s", "4 of 4 in 2 s"]
    assert digest(checkpoints_dir) == before  # step 4 neither set aside nor given up for step 2
    assert not os.path.exists(os.path.join(copy, UNET_FILE))


def test_a_truncated_file_still_falls_back_to_the_newest_good_step(copy, trained, pipeline_dir, dataset_dir):
    """OUT_OF_RANGE from a real truncated file: `latest` warns, resumes from step 2, sets step 4 aside, and the
    steps trained again give the uninterrupted run's export bit for bit. Without retries: damage is not retried."""
    for path in glob.glob(os.path.join(copy, "checkpoints", "4", "params", "ocdbt.process_0", "d", "*")):
        os.truncate(path, os.path.getsize(path) // 2)
    result = run(argv(pipeline_dir, dataset_dir, copy, "--resume_from_checkpoint", "latest"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoints/4 cannot be restored: OUT_OF_RANGE: Error reading " in result.stderr
    assert "falling back to an older checkpoint" in result.stderr and "attempt 2" not in result.stderr
    assert "(step 2 of 4)" in result.stdout
    assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == ["2", "4", "4.damaged"]
    assert [entry["step"] for entry in logged_steps(copy)][-2:] == [3, 4]
    assert unet_bytes(copy) == unet_bytes(trained)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_one_host_that_cannot_read_stops_both(copy, pipeline_dir, dataset_dir):
    """Two processes (4 devices each) resume the 8-device checkpoint; every array read of process 1 fails
    (UNAVAILABLE). Process 1 retries and gives up; process 0, which read step 4, does not go on alone or fall back:
    both exit with code 1, each with one line, and nothing is renamed."""
    checkpoints_dir = os.path.join(copy, "checkpoints")
    before = digest(checkpoints_dir)
    command = argv(pipeline_dir, dataset_dir, copy, "--resume_from_checkpoint", "latest", "--multihost", entry=ENTRY)
    command[command.index("--cpu_devices") + 1] = "4"
    port = free_port()
    workers = [subprocess.Popen(command, env=dict(environment(), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                                  JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank),
                                                  T2I_FLAX_TEST_READ_FAULT="UNAVAILABLE:-1:1",
                                                  T2I_FLAX_TEST_READ_DELAYS=DELAYS),
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for rank in range(2)]
    try:
        outputs = [worker.communicate(timeout=600) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert [worker.returncode for worker in workers] == [1, 1], [err[-3000:] for _, err in outputs]
    reason = (f"reading checkpoint {checkpoints_dir}/4 failed 4 times (UNAVAILABLE: Error reading "
              f"\"params.conv_in.kernel/0.0.0.0\" in OCDBT database at gcs \"gs://bucket/run/checkpoints/4/params/\": "
              f"HTTP response code: 503 with body: Service Unavailable); nothing was renamed or deleted: run again "
              f"when the storage answers")
    assert error_lines(outputs[1][1]) == [f"error: {reason}"], outputs[1][1][-3000:]
    assert error_lines(outputs[0][1]) == [f"error: {reason} (on process 1)"], outputs[0][1][-3000:]
    assert all("Traceback" not in err for _, err in outputs)
    assert len([line for line in outputs[1][1].splitlines() if line.startswith("process 1: reading checkpoint ")]) == 3
    assert "resumed from" not in outputs[0][0] and "falling back" not in outputs[0][1]
    assert digest(checkpoints_dir) == before


# ---- a bucket that answers 503 for a while ----------------------------------------------------------------------

class FailingProxy(http.server.ThreadingHTTPServer):
    """Forwards every request to the GCS emulator, except that for `seconds` after `/_arm?seconds=S` it answers
    every request with 503 Service Unavailable, as GCS does while it sheds load."""
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = urllib.parse.urlparse(upstream)
        self.lock = threading.Lock()
        self.failing_until, self.failed, self.forwarded = 0.0, [], 0
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return  # a client that dropped its connection (tensorstore cancels reads it no longer needs)
        super().handle_error(request, client_address)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _handle(self):
        proxy = self.server
        if self.path.startswith("/_arm"):
            with proxy.lock:
                seconds = float(urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)["seconds"][0])
                proxy.failing_until = time.monotonic() + seconds
            self._answer(200, [], b"armed")
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        with proxy.lock:
            fail = time.monotonic() < proxy.failing_until
            if fail:
                proxy.failed.append((time.monotonic(), self.command, urllib.parse.unquote(self.path)))
            else:
                proxy.forwarded += 1
        if fail:
            self._answer(503, [("Content-Type", "application/json")],
                         json.dumps({"error": {"code": 503, "message": "Service Unavailable (test proxy)"}}).encode())
            return
        upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
        headers = {key: value for key, value in self.headers.items() if key.lower() not in ("host", "connection", "expect")}
        upstream.request(self.command, self.path, body=body, headers=headers)
        answer = upstream.getresponse()
        content = answer.read()
        upstream.close()
        self._answer(answer.status, [(key, value) for key, value in answer.getheaders()
                                     if key.lower() not in ("connection", "content-length", "transfer-encoding")],
                     content)

    def _answer(self, status, headers, content):
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(content)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle


@pytest.fixture
def failing_proxy(gcs):  # noqa: F811
    proxy = FailingProxy(gcs.url)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()
    thread.join()


# gcsfs tries a request 6 times, waiting 1 + 2 + 4 + 8 + 16 s and a jitter between them (31 to 36 s measured); the
# test keeps its tries but divides its waits by 8 (about 4 to 4.5 s): a bucket that answers 503 for 8 s outlasts them,
# and our retry, 6 s later, finds it answering again.
GCSFS_BACKOFF, FAILING_SECONDS, DELAYS_IN_A_BUCKET = "0.125", 8, "6,6,6"


def test_a_bucket_that_answers_503_for_a_while_is_retried_and_resumes_the_newest(gcs, failing_proxy, trained,  # noqa: F811
                                                                                  pipeline_dir, dataset_dir, tmp_path):
    """The run's checkpoints in the emulator's bucket, reached through a proxy that answers 503 for 8 s from the
    moment the restore starts: gcsfs retries its requests (its waits shortened 8 times) and gives up, our retry
    waits 6 s and tries again, and the run resumes step 4. Every step folder stays; the export equals the run's."""
    prefix = "faults/checkpoints"
    local = os.path.join(trained, "checkpoints")
    for path in sorted(digest(local)):
        (epath.Path(f"gs://{BUCKET}/{prefix}") / path).write_bytes(open(os.path.join(local, path), "rb").read())
    before = gcs.objects(f"{prefix}/")
    assert sorted({name.split("/")[0] for name in before}) == ["2", "4"]

    bucket_dir = f"gs://{BUCKET}/{prefix}"
    output_dir = str(tmp_path / "out")
    command = argv(pipeline_dir, dataset_dir, output_dir, "--checkpoints_dir", bucket_dir,
                   "--resume_from_checkpoint", "latest", entry=ENTRY)
    result = run(command, **emulator_environment(failing_proxy.url), T2I_FLAX_TEST_READ_DELAYS=DELAYS_IN_A_BUCKET,
                 T2I_FLAX_TEST_ARM_URL=f"{failing_proxy.url}/_arm?seconds={FAILING_SECONDS}",
                 T2I_FLAX_TEST_GCSFS_BACKOFF=GCSFS_BACKOFF)
    assert result.returncode == 0, result.stderr[-3000:]
    failed = failing_proxy.failed
    retries = [line for line in result.stderr.splitlines() if line.startswith("reading checkpoint ")]
    print(f"\n{len(failed)} answers 503 over {failed[-1][0] - failed[0][0]:.1f} s, {failing_proxy.forwarded} requests "
          f"forwarded, the run took {result.seconds:.1f} s; ours: {retries}")
    assert failed[-1][0] - failed[0][0] > 25 * float(GCSFS_BACKOFF) and len(failed) >= 6  # gcsfs's tries and waits
    assert retries == [f"reading checkpoint {bucket_dir}/4 failed (HttpError: Service Unavailable (test proxy), 503); "
                       f"attempt 2 of 4 in 6 s"], result.stderr[-3000:]
    assert f"resumed from {bucket_dir}/4 (step 4 of 4)" in result.stdout
    assert "falling back" not in result.stderr and "Traceback" not in result.stderr
    assert gcs.objects(f"{prefix}/") == before  # nothing renamed, deleted or written
    assert unet_bytes(output_dir) == unet_bytes(trained)
