"""Does a training configuration fit a TPU? The real train step compiled ahead of time for a TPU topology on a
CPU host (no TPU needed, only libtpu, the compiler): per-core memory and whether it fits.

    python -m t2i_flax.aot --topology v3-8 <the trainer's flags>
    t2i-flax-aot --topology v3-8 --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --resolution 512 --train_batch_size 2 --mixed_precision bf16 --fsdp 8 --use_ema

Needs `pip install libtpu==0.0.42.1` (what `jax[tpu]==0.10.2` pins) next to the CPU jax.

The trainer's flags are read by the trainer's own parser (t2i_flax.cli.parse_config) and the step is built by
the trainer's own functions (train.make_step_config, train.init_lora, step.state_shardings,
step.compile_train_step, the sharding table): --fsdp, --mixed_precision, --use_ema, --lora_rank,
--train_batch_size (per device), --resolution, --attention and the optimizer flags mean what they mean there.
Nothing is loaded but the model's config files and tokenizer: parameters, optimizer state, EMA, frozen models
and the batch are ShapeDtypeStructs with the trainer's shardings (a Hub repo id downloads its configs only).
No data is read: --dataset_name / --train_data_dir may be left out (or given, and are then ignored).
--validation_prompts also compiles the validation sampler (t2i_flax/validation.py's program) and reports its
memory with the training state resident beside it, as it is while training.

Output: a report on stdout (progress on stderr), or with --json one JSON object. Per core: arguments, outputs,
aliased (the donated state, counted once), temporaries, total = arguments + outputs - aliased + temporaries,
against the usable HBM per core the compiler reports for the topology (found by compiling an over-large
program; the documented table USABLE_HBM_GIB if that fails). "from shapes" is the per-core bytes of the
sharded ShapeDtypeStructs themselves (the compiler's arguments add TPU tile padding).

Exit codes: 0 it fits; 3 (EXIT_DOES_NOT_FIT) the train step or the validation sampler does not fit (the
report shows the compiler's RESOURCE_EXHAUSTED line); 2 a bad flag, model folder or a missing libtpu (one line
on stderr, as the trainer); 1 a bug (traceback)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import tempfile
import time

from t2i_flax import cli, errors

EXIT_FITS = 0
EXIT_DOES_NOT_FIT = 3
LIBTPU_PIN = "libtpu==0.0.42.1"  # what jax[tpu]==0.10.2 pins (libtpu==0.0.42.*)
# --dataset_name given to the trainer's parser when neither data flag is: the trainer requires one, aot reads none.
NO_DATASET = "<no dataset: t2i_flax.aot reads no data>"


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


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as the trainer's parser
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(errors.EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m t2i_flax.aot", allow_abbrev=False, description=__doc__.split("\n\n")[0],
                     epilog="Every other flag is the trainer's (python train_text_to_image_flax.py --help).")
    parser.add_argument("--topology", default="v3-8",
                        help=f"{', '.join(TOPOLOGIES)} (or a libtpu topology name such as v3:4x4)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    return parser


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


# ---- the topology and its memory -------------------------------------------------------------------

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


# ---- the model, from its configs only ------------------------------------------------------------------

def config_dir(config) -> str:
    """The model folder, or for a Hub repo id a snapshot of its config and tokenizer files only (no weights)."""
    from t2i_flax import hub

    model = config.model
    name = model.pretrained_model_name_or_path
    if os.path.isdir(name):
        return hub.resolve_model_dir(name)
    if name.startswith((".", "/", "~")) or not hub._REPO_ID.match(name) or name.count("/") > 1:
        raise hub.ModelNotFoundError(f"model folder {name} does not exist (and it is not a Hub repo id)")
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json"] + [f"{part}/{pattern}" for part in hub.PIPELINE_COMPONENTS
                                       for pattern in ("*.json", "*.txt")]
    try:
        return snapshot_download(name, revision=model.revision, cache_dir=model.cache_dir, allow_patterns=patterns,
                                 local_files_only=hub._offline())
    except Exception as error:  # noqa: BLE001  (huggingface_hub's errors: not found, offline, network)
        raise hub.ModelNotFoundError(f"could not get the configs of {name}: {errors.one_line(error)[:200]}") from None


def abstract_models(config, model_dir: str, dtype):
    """(unet, vae, text_encoder) modules as train.load_models builds them, from the configs alone."""
    from t2i_flax.models import FlaxAutoencoderKL, FlaxCLIPTextModel, FlaxUNet2DConditionModel

    common = dict(variant=config.model.variant, dtype=dtype, load_weights=False)
    attention = config.model.attention
    unet, _ = FlaxUNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", attention=attention, **common)
    vae, _ = FlaxAutoencoderKL.from_pretrained(model_dir, subfolder="vae", **common)
    text_encoder, _ = FlaxCLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", attention=attention,
                                                        **common)
    return unet, vae, text_encoder


def make_plan(config, device_count: int, devices_per_host: int):
    """train.Plan for `device_count` devices (train.Plan.make counts the devices of this process). The data
    only sets the schedule's length, not the step's memory: without --max_train_steps, one step an epoch."""
    from t2i_flax import train

    per_device = config.train.train_batch_size
    global_batch = per_device * device_count
    learning_rate = config.optimizer.learning_rate * (global_batch if config.optimizer.scale_lr else 1)
    steps = config.train.max_train_steps or config.train.num_train_epochs
    return train.Plan(global_batch_size=global_batch, host_batch_size=per_device * devices_per_host,
                      learning_rate=learning_rate, num_examples=global_batch, steps_per_epoch=1,
                      max_train_steps=steps, num_train_epochs=steps)


def _placed(tree, shardings):
    import jax

    return jax.tree_util.tree_map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
                                  tree, shardings)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shape = tuple(leaf.shape)
        if getattr(leaf, "sharding", None) is not None:
            shape = leaf.sharding.shard_shape(shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def param_count(tree) -> int:
    import jax
    import numpy as np

    return sum(int(np.prod(leaf.shape, dtype=np.int64)) for leaf in jax.tree_util.tree_leaves(tree))


@dataclasses.dataclass
class Setup:
    """Everything the step is compiled from, abstract."""
    step_config: object
    mesh: object
    state: object          # sharded ShapeDtypeStructs of step.TrainState
    state_sharding: object
    frozen: dict
    frozen_sharding: object
    batch: dict
    unet: object
    vae: object
    text_encoder: object
    tokenizer: object
    scheduler_config: dict
    plan: object


def build_setup(config, model_dir: str, devices) -> Setup:
    """The trainer's step, state, frozen models and batch (train.run's "state" section), from shapes only."""
    import jax
    import jax.numpy as jnp

    from t2i_flax import sharding, step, tokenizer, train
    from t2i_flax.noise import read_scheduler_config, schedule_from_config

    scheduler_config = read_scheduler_config(model_dir)
    noise_schedule = schedule_from_config(scheduler_config, config.model.prediction_type)
    clip_tokenizer = tokenizer.load_tokenizer(os.path.join(model_dir, "tokenizer"))
    dtype = train.COMPUTE_DTYPES[config.model.mixed_precision]
    unet, vae, text_encoder = abstract_models(config, model_dir, dtype)
    vae_factor = 2 ** (len(vae.block_out_channels) - 1)
    if config.data.resolution % vae_factor:
        raise errors.FlagError(f"--resolution {config.data.resolution} must be a multiple of {vae_factor} for this VAE")
    mesh = sharding.make_mesh(config.devices.fsdp, devices)
    hosts = len({device.process_index for device in devices})
    plan = make_plan(config, len(devices), len(devices) // hosts)
    use_lora = config.lora.enabled
    step_config = train.make_step_config(config, plan, unet, vae, text_encoder, noise_schedule)
    trained_shape = jax.eval_shape(train.init_lora(config, unet)) if use_lora else unet.abstract_params()
    abstract_state, state_sharding = step.state_shardings(step_config, mesh, trained_shape, config.train.seed)
    frozen = jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, dtype), step.frozen_params(
        vae.abstract_params(), text_encoder.abstract_params(), unet.abstract_params() if use_lora else None))
    frozen_sharding = sharding.tree_shardings(mesh, frozen)
    batch_sharding = sharding.batch_sharding(mesh)
    resolution, length = config.data.resolution, int(clip_tokenizer.model_max_length)
    # As train.compile_ahead describes the batch.
    batch = {"pixel_values": jax.ShapeDtypeStruct((plan.global_batch_size, 3, resolution, resolution), jnp.float32,
                                                  sharding=batch_sharding),
             "input_ids": jax.ShapeDtypeStruct((plan.global_batch_size, length), jnp.int32, sharding=batch_sharding)}
    return Setup(step_config, mesh, _placed(abstract_state, state_sharding), state_sharding,
                 _placed(frozen, frozen_sharding), frozen_sharding, batch, unet, vae, text_encoder, clip_tokenizer,
                 scheduler_config, plan)


# ---- compiling and measuring ---------------------------------------------------------------------------

def _memory(compiled) -> dict:
    analysis = compiled.memory_analysis()
    names = {"argument_bytes": "argument_size_in_bytes", "output_bytes": "output_size_in_bytes",
             "alias_bytes": "alias_size_in_bytes", "temp_bytes": "temp_size_in_bytes",
             "code_bytes": "generated_code_size_in_bytes"}
    memory = {key: int(getattr(analysis, name, 0) or 0) for key, name in names.items()}
    memory["total_bytes"] = (memory["argument_bytes"] + memory["output_bytes"] - memory["alias_bytes"]
                             + memory["temp_bytes"])
    return memory


def _exhausted_lines(error: BaseException) -> list[str]:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = next((line for line in lines if "RESOURCE_EXHAUSTED" in line), lines[0] if lines else repr(error))
    more = [line for line in lines if line != first and re.search(r"exceed|Used [\d.]+[GMK]? of", line)][:2]
    return [first[:500]] + [line[:500] for line in more]


def compile_measured(compile_program) -> tuple[dict, object]:
    """({"fits", "compile_s", "memory" | "error"}, the compiled program or None) of `compile_program()`;
    RESOURCE_EXHAUSTED at compile time is "does not fit"."""
    import jax

    start = time.perf_counter()
    try:
        compiled = compile_program()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return {"fits": False, "compile_s": round(time.perf_counter() - start, 1), "memory": None,
                "error": _exhausted_lines(error)}, None
    result = {"fits": True, "compile_s": round(time.perf_counter() - start, 1), "memory": _memory(compiled),
              "error": None}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        result["flops_per_device"] = float(cost["flops"]) if cost and cost.get("flops") else None
    except Exception:  # noqa: BLE001  (informational only)
        result["flops_per_device"] = None
    return result, compiled


def padded_bytes(leaf, layout) -> int:
    """Bytes of one device's shard of `leaf` in the compiled `layout`: the dimensions in major-to-minor order,
    the minor ones rounded up to the layout's (first) tile, e.g. (8, 128) for a float32 matrix on a TPU."""
    import numpy as np

    shape = tuple(leaf.sharding.shard_shape(tuple(leaf.shape)))
    dims = [shape[d] for d in layout.major_to_minor] if shape else [1]
    tile = tuple(layout.tiling[0]) if layout.tiling else ()
    for i in range(1, len(tile) + 1):
        if i <= len(dims):
            dims[-i] = -(-dims[-i] // tile[-i]) * tile[-i]
        else:
            dims.insert(0, tile[-i])
    return int(np.prod(dims, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize


def argument_breakdown(compiled, groups: dict) -> dict | None:
    """{group: per-device bytes in the compiled layouts} for the compiled program's arguments, given as
    {group: tree} in argument order; None where the layouts cannot be read or do not line up."""
    import jax

    try:
        formats = jax.tree_util.tree_leaves(compiled.input_formats, is_leaf=lambda x: hasattr(x, "layout"))
    except Exception:  # noqa: BLE001  (a backend without input layouts)
        return None
    leaves = [(name, leaf) for name, tree in groups.items() for leaf in jax.tree_util.tree_leaves(tree)]
    if len(formats) != len(leaves) or any(getattr(f, "layout", None) is None for f in formats):
        return None
    breakdown = dict.fromkeys(groups, 0)
    for (name, leaf), where in zip(leaves, formats):
        breakdown[name] += padded_bytes(leaf, where.layout)
    return breakdown


def train_step_report(config, setup: Setup) -> dict:
    from t2i_flax import step

    train_step = step.compile_train_step(setup.step_config, setup.mesh, setup.state_sharding, setup.frozen_sharding)
    result, compiled = compile_measured(lambda: train_step.lower(setup.state, setup.frozen, setup.batch).compile())
    state = setup.state
    groups = {"params": state.params, "opt_state": state.opt_state, "ema": state.ema_params,
              "step_and_rng": (state.step, state.rng), "frozen": setup.frozen, "batch": setup.batch}
    result["shapes"] = {f"{name}_bytes": per_device_bytes(tree) for name, tree in groups.items()}
    result["shapes"]["state_bytes"] = per_device_bytes(state)
    result["shapes"]["argument_bytes"] = sum(per_device_bytes(tree) for tree in groups.values())
    result["padded"] = None
    if compiled is not None:
        # TrainState's leaves come in field order (step, params, opt_state, ema_params, rng): regroup them.
        ordered = {"step_and_rng": state.step, "params": state.params, "opt_state": state.opt_state,
                   "ema": state.ema_params, "rng": state.rng, "frozen": setup.frozen, "batch": setup.batch}
        padded = argument_breakdown(compiled, ordered)
        if padded is not None:
            padded["step_and_rng"] += padded.pop("rng")
            padded = {f"{name}_bytes": value for name, value in padded.items()}
            padded["argument_bytes"] = sum(padded.values())
        result["padded"] = padded
    result["trained_params"] = param_count(state.params)
    return result


def validation_report(config, setup: Setup) -> dict:
    """The validation sampler as validation.Validation compiles it (same batch padding, scheduler, params and
    shardings), and its memory with the rest of the training state resident."""
    import jax

    from t2i_flax import lora, sharding, train
    from t2i_flax.diffusion import sample, schedulers

    settings = config.validation
    mesh = setup.mesh
    count = len(settings.validation_prompts) * settings.num_validation_images
    batch = -(-count // mesh.size) * mesh.size
    scheduler = schedulers.make_scheduler(setup.scheduler_config, settings.validation_num_inference_steps,
                                          settings.validation_scheduler)
    sampler = sample.Sampler(setup.unet, setup.vae, setup.text_encoder, mesh,
                             lora.sampler_unet_fn(setup.unet) if config.lora.enabled else None)
    dtype = jax.tree_util.tree_leaves(setup.frozen["text_encoder"])[0].dtype
    # What Validation puts on the devices of the VAE: the decoder half, in the compute dtype.
    vae_params = setup.vae.abstract_params()
    decoder = jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, dtype),
                                     {name: vae_params[name] for name in sample.VAE_DECODER_PARAMS})
    decoder = _placed(decoder, sharding.tree_shardings(mesh, decoder))
    unet_params = train._abstract(train.sampler_unet(train.weights_to_export(setup.state, config), setup.frozen,
                                                     config))
    abstract = sample.sampler_params(unet_params, setup.frozen["text_encoder"], decoder)
    guidance = settings.validation_guidance_scale > 1.0
    length = int(setup.tokenizer.model_max_length)
    result, _ = compile_measured(lambda: sampler.compile(abstract, scheduler, batch, config.data.resolution,
                                                      config.data.resolution, guidance, max_length=length))
    shared = per_device_bytes([leaf for leaf in jax.tree_util.tree_leaves(unet_params)
                               if getattr(leaf, "sharding", None) is not None]) \
        + per_device_bytes(setup.frozen["text_encoder"])
    # While sampling, the training state and frozen models stay on the devices; the sampler's own arguments
    # already count the UNet (or adapters + frozen UNet) and the text encoder among them.
    resident = per_device_bytes(setup.state) + per_device_bytes(setup.frozen) - shared
    result.update(images=count, batch=batch, scheduler=scheduler.kind, steps=settings.validation_num_inference_steps,
                  guidance=guidance, resident_bytes=resident, decoder_bytes=per_device_bytes(decoder))
    if result["memory"] is not None:
        result["with_training_bytes"] = result["memory"]["total_bytes"] + resident
    return result


# ---- the report ------------------------------------------------------------------------------------------

def _size(value) -> str:
    """Bytes as GiB (2 decimals), or MiB below 1 GiB (tiny models)."""
    if value is None:
        return "-"
    return f"{value / 2**30:.2f} GiB" if abs(value) >= 2**30 else f"{value / 2**20:.1f} MiB"


def report_text(result: dict) -> str:
    usable = result["usable_hbm_bytes"]
    lines = [f"topology: {result['topology']} ({result['libtpu_topology']}): {result['devices']} x "
             f"{result['device_kind']} of {result['hbm_gib']:g} GiB, {result['hosts']} host(s); usable HBM per device "
             f"{_size(usable)} "
             f"({'reported by the compiler' if result['usable_hbm_source'] == 'compiler' else 'documented table'})",
             f"model: {result['model']} ({result['prediction_type']}), compute {result['compute_dtype']}, "
             f"{'LoRA rank ' + str(result['lora_rank']) if result['lora_rank'] else 'full fine-tuning'}, "
             f"EMA {'yes' if result['use_ema'] else 'no'}",
             f"layout: mesh data={result['mesh']['data']} fsdp={result['mesh']['fsdp']}; batch "
             f"{result['batch_per_device']} per device ({result['global_batch']} global) at {result['resolution']} px"]
    step = result["train_step"]
    lines.append(f"train step ({step['trained_params']:,} trained parameters), compiled in {step['compile_s']} s:")
    for title, sizes in (("arguments in the compiled layouts", step["padded"]),
                         ("arguments from shapes", step["shapes"])):
        if sizes:
            lines.append(f"  {title}: {_size(sizes['argument_bytes'])} = params {_size(sizes['params_bytes'])} + Adam "
                         f"{_size(sizes['opt_state_bytes'])} + EMA {_size(sizes['ema_bytes'])} + frozen models "
                         f"{_size(sizes['frozen_bytes'])} + batch {_size(sizes['batch_bytes'])}")
    lines += _memory_lines(step, usable)
    validation = result.get("validation")
    if validation is not None:
        lines.append(f"validation sampler ({validation['images']} images as a batch of {validation['batch']}, "
                     f"{validation['scheduler']} {validation['steps']} steps, guidance "
                     f"{'on' if validation['guidance'] else 'off'}), compiled in {validation['compile_s']} s:")
        lines += _memory_lines(validation, usable)
        if validation["memory"] is not None:
            total = validation["with_training_bytes"]
            verdict = (f"fits ({_size(usable - total)} headroom)" if total <= usable else "DOES NOT FIT")
            lines.append(f"  + the rest of the training state, resident meanwhile "
                         f"({_size(validation['resident_bytes'])}): {_size(total)} of {_size(usable)} -> {verdict}")
    lines.append(f"result: {'fits' if result['fits'] else 'DOES NOT FIT'} on a {result['topology']}")
    return "\n".join(lines)


def _memory_lines(part: dict, usable: int) -> list[str]:
    memory = part["memory"]
    if memory is None:
        return ["  DOES NOT FIT: " + part["error"][0]] + ["    " + line for line in part["error"][1:]]
    return [f"  per device: arguments {_size(memory['argument_bytes'])} + outputs {_size(memory['output_bytes'])} "
            f"- aliased {_size(memory['alias_bytes'])} + temporaries {_size(memory['temp_bytes'])} "
            f"= {_size(memory['total_bytes'])} of {_size(usable)} -> fits "
            f"({_size(usable - memory['total_bytes'])} headroom)"]


def run(own, topology: Topology, config) -> dict:
    import jax

    progress = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    devices = topology_devices(topology)
    usable, source = usable_hbm(devices, topology)
    if config.devices.cpu_devices or config.devices.multihost:
        progress("note: --cpu_devices and --multihost do not apply: the devices are the topology's")
    model_dir = config_dir(config)
    setup = build_setup(config, model_dir, devices)
    result = {
        "topology": topology.name, "libtpu_topology": topology.libtpu_name, "device_kind": devices[0].device_kind,
        "devices": len(devices), "hosts": len({d.process_index for d in devices}), "hbm_gib": topology.hbm_gib,
        "usable_hbm_bytes": usable,
        "usable_hbm_source": source, "model": config.model.pretrained_model_name_or_path,
        "prediction_type": setup.step_config.noise_schedule.prediction_type,
        "compute_dtype": str(jax.numpy.dtype(setup.step_config.unet.dtype)), "fsdp": config.devices.fsdp,
        "mesh": dict(setup.mesh.shape), "use_ema": config.train.use_ema, "lora_rank": config.lora.lora_rank,
        "resolution": config.data.resolution, "batch_per_device": config.train.train_batch_size,
        "global_batch": setup.plan.global_batch_size, "jax": jax.__version__, "libtpu": _libtpu_version()}
    progress(f"compiling the train step for {topology.name} ({len(devices)} x {devices[0].device_kind}, "
             f"batch {config.train.train_batch_size} per device) ...")
    result["train_step"] = train_step_report(config, setup)
    fits = result["train_step"]["fits"]
    if config.validation.validation_prompts:
        progress("compiling the validation sampler ...")
        validation = validation_report(config, setup)
        result["validation"] = validation
        fits = fits and validation["fits"] and validation["with_training_bytes"] <= usable
    else:
        result["validation"] = None
    result["fits"] = bool(fits)
    return result


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
    print(json.dumps(result) if own.json else report_text(result), flush=True)
    return EXIT_FITS if result["fits"] else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    raise SystemExit(main())
