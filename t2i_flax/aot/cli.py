"""python -m t2i_flax.aot: the flags, the run and the exit codes (see t2i_flax/aot/__init__.py)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from t2i_flax import cli, compile_cache, errors
from t2i_flax.aot import cache, measure, report
from t2i_flax.aot.topology import TOPOLOGIES, Topology, resolve_topology, topology_devices, usable_hbm

EXIT_FITS = 0
EXIT_DOES_NOT_FIT = 3
# --dataset_name given to the trainer's parser when neither data flag is: the trainer requires one, aot reads none.
NO_DATASET = "<no dataset: t2i_flax.aot reads no data>"
DESCRIPTION = ("Does a training configuration fit a TPU? The real train step compiled ahead of time for a TPU "
               "topology on a CPU host (no TPU needed, only libtpu, the compiler): per-core memory and whether it fits.")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as the trainer's parser
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(errors.EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m t2i_flax.aot", allow_abbrev=False, description=DESCRIPTION,
                     epilog="Every other flag is the trainer's (python train_text_to_image_flax.py --help).")
    parser.add_argument("--topology", default="v3-8",
                        help=f"{', '.join(TOPOLOGIES)} (or a libtpu topology name such as v3:4x4)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    return parser


def parse_flags(argv=None):
    """(aot's own options, the Topology, the trainer's RunConfig). Bad flags: FlagError or exit 2 (one line).

    The trainer requires --dataset_name or --train_data_dir; aot reads no data, so when --dataset_name is not
    given it passes a placeholder one to the trainer's parser (which then checks no --train_data_dir either)."""
    own, rest = build_parser().parse_known_args(argv)
    topology = resolve_topology(own.topology)
    seen, _ = cli.build_parser().parse_known_args(rest)  # exits 2 with one line without --pretrained_...
    if seen.dataset_name is None:
        rest = list(rest) + ["--dataset_name", NO_DATASET]
    config = cli.parse_config(rest)
    if config.model.attention == "cudnn":
        raise errors.FlagError("--attention cudnn is for GPUs; a TPU step uses XLA attention (leave --attention out)")
    return own, topology, config


def build_setup(config, devices):
    """The trainer's setup (t2i_flax/setup.py) on the topology's devices, from the model's configs only (a Hub
    repo id downloads its config and tokenizer files, no weights)."""
    from t2i_flax import hub, setup, sharding

    base = setup.read_base_model(hub.resolve_config_dir(config.model), config.model)
    mesh = sharding.make_mesh(config.devices.fsdp, devices)
    hosts = len({device.process_index for device in devices})
    plan = setup.Plan.without_data(config, len(devices), len(devices) // hosts)
    return setup.build(config, base, mesh, plan)


def run(own, topology: Topology, config) -> dict:
    import jax

    progress = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    devices = topology_devices(topology)
    usable, source = usable_hbm(devices, topology)
    if config.devices.cpu_devices or config.devices.multihost:
        progress("note: --cpu_devices and --multihost do not apply: the devices are the topology's")
    built = build_setup(config, devices)
    kept = measure_cache(config, topology)
    result = {
        "topology": topology.name, "libtpu_topology": topology.libtpu_name, "device_kind": devices[0].device_kind,
        "devices": len(devices), "hosts": len({d.process_index for d in devices}), "hbm_gib": topology.hbm_gib,
        "usable_hbm_bytes": usable,
        "usable_hbm_source": source, "model": config.model.pretrained_model_name_or_path,
        "prediction_type": built.noise_schedule.prediction_type,
        "compute_dtype": str(jax.numpy.dtype(built.dtype)), "fsdp": config.devices.fsdp,
        "mesh": dict(built.mesh.shape), "cache_latents": config.data.cache_latents, "use_ema": config.train.use_ema, "lora_rank": config.lora.lora_rank,
        "resolution": config.data.resolution, "batch_per_device": config.train.train_batch_size,
        "global_batch": built.plan.global_batch_size, "jax": jax.__version__, "libtpu": _libtpu_version()}
    progress(f"compiling the train step for {topology.name} ({len(devices)} x {devices[0].device_kind}, "
             f"batch {config.train.train_batch_size} per device) ...")
    if config.data.aspect_ratio_buckets:
        result["train_step"], result["buckets"] = bucket_reports(built, config.data.train_sizes(), progress, kept)
    else:
        result["train_step"], result["buckets"] = measure.train_step_report(built, cache=kept), None
    fits = result["train_step"]["fits"]
    if config.validation.validation_prompts:
        progress("compiling the validation sampler ...")
        validation = measure.validation_report(built, kept)
        result["validation"] = validation
        fits = fits and validation["fits"] and validation["with_training_bytes"] <= usable
    else:
        result["validation"] = None
    result["fits"] = bool(fits)
    return result


def measure_cache(config, topology: Topology) -> cache.MeasureCache:
    """What was measured before, in the trainer's compilation cache folder (--compilation_cache_dir; `none`: off).
    A bucket's gs:// folder holds JAX's cache but not aot's: aot keeps nothing there."""
    directory = config.devices.compilation_cache_dir
    directory = None if directory == compile_cache.OFF else directory or compile_cache.default_dir()
    if directory is not None and "://" in directory:
        directory = None
    topology_key = json.dumps([topology.libtpu_name, topology.options, _libtpu_version()], sort_keys=True)
    return cache.MeasureCache(directory, topology_key)


def bucket_reports(built, sizes, progress, kept=None) -> tuple[dict, list]:
    """(the report of the bucket that needs the most memory, or of the first that does not fit; every bucket's
    {"width", "height", "fits", "total_bytes"}). aot reads no data, so every bucket of the flags is compiled: a
    run compiles those its images fill."""
    worst, table = None, []
    for index, (width, height) in enumerate(sizes):
        progress(f"  bucket {index + 1} of {len(sizes)}: {width}x{height}")
        report_of = measure.train_step_report(built, (width, height), kept)
        report_of["bucket"] = [width, height]
        total = report_of["memory"]["total_bytes"] if report_of["memory"] else None
        table.append({"width": width, "height": height, "fits": report_of["fits"], "total_bytes": total})
        if worst is None or (worst["fits"] and (not report_of["fits"] or total > worst["memory"]["total_bytes"])):
            worst = report_of
    return worst, table


def _libtpu_version():
    try:
        from importlib.metadata import version

        return version("libtpu")
    except Exception:  # noqa: BLE001
        return None


def main(argv=None) -> int:
    try:
        own, topology, config = parse_flags(argv)
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the compiler is all we need of libtpu: never open a TPU
        # libtpu locks /tmp/libtpu_lockfile for the process that owns the TPU; compiling needs no TPU, so several
        # aot runs (or one beside a jax process that took the lock) may load it at once.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        result = run(own, topology, config)
    except errors.UserError as error:  # anything else is a bug: traceback, exit 1
        return errors.report(error)
    print(json.dumps(result) if own.json else report.report_text(result), flush=True)
    return EXIT_FITS if result["fits"] else EXIT_DOES_NOT_FIT
