"""t2i_flax.aot: the real train step compiled ahead of time for a TPU v3-8 topology on this CPU host (libtpu,
requirements-dev.txt), on the tiny pipeline. Each configuration runs `python -m t2i_flax.aot --json` in its own
process (the test process's jax is the CPU one with 8 simulated devices); the per-device numbers it reports
are checked against bytes computed here from the model's shapes and the sharding rule written out by hand."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from t2i_flax import optim, weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The optimizer's and EMA's numbers the step reads as float32/int32 scalars (optim.Hyperparameters), replicated.
HYPERPARAMETER_BYTES = 4 * len(optim.Hyperparameters.RUNTIME)
RES, BATCH, DEVICES, TEXT_LENGTH = 32, 2, 8, 77
GiB = 2**30


def run_aot(pipeline_dir, *flags, json_output=True):
    command = [sys.executable, "-m", "t2i_flax.aot", "--topology", "v3-8",
               "--pretrained_model_name_or_path", pipeline_dir, "--resolution", str(RES), *flags]
    if json_output:
        command.append("--json")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no simulated CPU devices needed there
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


@pytest.fixture(scope="module")
def shapes(pipeline_dir):
    """{path: shape} of the UNet, the VAE's encoder half and the text encoder, from their configs."""
    from t2i_flax.models import FlaxAutoencoderKL, FlaxCLIPTextModel, FlaxUNet2DConditionModel

    def flat(cls, sub):
        module, _ = cls.from_pretrained(pipeline_dir, subfolder=sub, load_weights=False)
        return {path: tuple(leaf.shape) for path, leaf in weights.flatten(module.abstract_params()).items()}

    vae = flat(FlaxAutoencoderKL, "vae")
    return {"unet": flat(FlaxUNet2DConditionModel, "unet"),
            "vae_encoder": {p: s for p, s in vae.items() if p[0] in ("encoder", "quant_conv")},
            "vae_decoder": {p: s for p, s in vae.items() if p[0] in ("decoder", "post_quant_conv")},
            "text_encoder": flat(FlaxCLIPTextModel, "text_encoder")}


def fsdp_shard(path, shape, n):
    """The shard one device holds under --fsdp n, written out from the README's rule: kernels split along their
    output features (last axis), embeddings along the vocabulary (first axis), when it divides; else whole."""
    shape = list(shape)
    if n > 1 and path[-1] == "kernel" and len(shape) in (2, 4) and shape[-1] % n == 0:
        shape[-1] //= n
    elif n > 1 and path[-1] == "embedding" and len(shape) == 2 and shape[0] % n == 0:
        shape[0] //= n
    return shape


def tree_bytes(flat_shapes, itemsize, fsdp=1):
    return sum(int(np.prod(fsdp_shard(path, shape, fsdp))) * itemsize for path, shape in flat_shapes.items())


@pytest.fixture(scope="module")
def replicated(pipeline_dir):
    done = run_aot(pipeline_dir, "--train_batch_size", str(BATCH))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def fsdp8_ema_validation(pipeline_dir):
    done = run_aot(pipeline_dir, "--train_batch_size", str(BATCH), "--fsdp", "8", "--use_ema", "--mixed_precision",
                   "bf16", "--validation_prompts", "a red circle", "--num_validation_images", "3")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_v3_8_topology_and_its_usable_memory(replicated):
    assert replicated["devices"] == DEVICES and replicated["hosts"] == 1
    assert replicated["device_kind"] == "TPU v3" and replicated["libtpu_topology"] == "v3:2x2"
    assert replicated["mesh"] == {"data": 8, "fsdp": 1}
    assert replicated["global_batch"] == BATCH * DEVICES
    # The compiler's "available HBM (15.48G)", bisected to 1 MiB: 15.482 GiB per v3 core.
    assert replicated["usable_hbm_source"] == "compiler"
    assert 15.475 * GiB <= replicated["usable_hbm_bytes"] <= 15.485 * GiB
    assert replicated["fits"] and replicated["train_step"]["fits"]


def test_replicated_per_core_bytes_are_the_shapes_bytes(replicated, shapes):
    found = replicated["train_step"]["shapes"]
    params = tree_bytes(shapes["unet"], 4)
    assert params == 4 * 792_964 == replicated["train_step"]["trained_params"] * 4
    assert found["params_bytes"] == params
    assert found["ema_bytes"] == 0
    # Adam's two moments, plus its int32 step counters (optax's adam and schedule counts).
    assert 2 * params < found["opt_state_bytes"] <= 2 * params + 4 * 4
    assert found["step_and_rng_bytes"] == 4 + 8  # int32 step, uint32[2] key
    frozen = tree_bytes(shapes["vae_encoder"], 4) + tree_bytes(shapes["text_encoder"], 4)  # float32 compute
    assert found["frozen_bytes"] == frozen + HYPERPARAMETER_BYTES
    assert found["batch_bytes"] == BATCH * (3 * RES * RES * 4 + TEXT_LENGTH * 4)
    assert found["argument_bytes"] == sum(found[k] for k in ("params_bytes", "opt_state_bytes", "ema_bytes",
                                                            "step_and_rng_bytes", "frozen_bytes", "batch_bytes"))


def test_compiled_arguments_are_the_padded_layouts_and_the_state_is_donated(replicated, fsdp8_ema_validation):
    for result in (replicated, fsdp8_ema_validation):
        step = result["train_step"]
        memory, padded, logical = step["memory"], step["padded"], step["shapes"]
        # The compiler's argument bytes are exactly our arguments laid out in TPU tiles (e.g. (8, 128) for f32).
        assert memory["argument_bytes"] == padded["argument_bytes"]
        for name in ("params_bytes", "opt_state_bytes", "frozen_bytes", "batch_bytes"):
            assert logical[name] <= padded[name] < 4 * logical[name] + 2**20
        state = sum(padded[k] for k in ("params_bytes", "opt_state_bytes", "ema_bytes", "step_and_rng_bytes"))
        assert memory["alias_bytes"] == state  # the donated state's buffers are reused by the new state
        assert memory["total_bytes"] == (memory["argument_bytes"] + memory["output_bytes"] - memory["alias_bytes"]
                                         + memory["temp_bytes"])
        assert 0 < memory["total_bytes"] < result["usable_hbm_bytes"]


def test_fsdp8_shards_params_adam_ema_and_frozen_models(replicated, fsdp8_ema_validation, shapes):
    assert fsdp8_ema_validation["mesh"] == {"data": 1, "fsdp": 8}
    found = fsdp8_ema_validation["train_step"]["shapes"]
    params = tree_bytes(shapes["unet"], 4, fsdp=8)
    assert found["params_bytes"] == found["ema_bytes"] == params
    assert 2 * params < found["opt_state_bytes"] <= 2 * params + 16
    # The frozen models run in bf16 (2 bytes) and are sharded by the same rule.
    assert found["frozen_bytes"] == (tree_bytes(shapes["vae_encoder"], 2, 8) + tree_bytes(shapes["text_encoder"], 2, 8)
                                     + HYPERPARAMETER_BYTES)
    # Against the replicated run: the shrink factor of the parameters is the one the rule gives (all but biases,
    # norms and indivisible kernels split 8 ways): 792,964 float32 -> 106,516 per core.
    factor = replicated["train_step"]["shapes"]["params_bytes"] / found["params_bytes"]
    assert factor == pytest.approx(tree_bytes(shapes["unet"], 4) / params)
    assert params == 4 * 106_516 and 7.4 < factor < 7.5


def test_validation_sampler_is_compiled_with_the_training_state_beside_it(fsdp8_ema_validation, shapes):
    validation = fsdp8_ema_validation["validation"]
    assert validation["fits"] and validation["images"] == 3 and validation["batch"] == 8  # padded to the devices
    assert validation["scheduler"] == "pndm" and validation["steps"] == 20 and validation["guidance"]
    found = fsdp8_ema_validation["train_step"]["shapes"]
    # Resident beside the sampler: the state and frozen models, less what the sampler reads (EMA UNet, text).
    text = tree_bytes(shapes["text_encoder"], 2, 8)
    assert validation["resident_bytes"] == found["state_bytes"] + found["frozen_bytes"] - found["ema_bytes"] - text
    assert validation["with_training_bytes"] == validation["memory"]["total_bytes"] + validation["resident_bytes"]
    # The VAE decoder goes to the devices for validation only, in bf16, sharded like the rest.
    assert validation["decoder_bytes"] == tree_bytes(shapes["vae_decoder"], 2, 8)


def test_lora_trains_only_the_adapters_on_the_frozen_unet(pipeline_dir, shapes):
    done = run_aot(pipeline_dir, "--train_batch_size", str(BATCH), "--lora_rank", "4", "--use_ema",
                   "--mixed_precision", "bf16")
    assert done.returncode == 0, done.stderr
    step = json.loads(done.stdout)["train_step"]
    adapted = {path: shape for path, shape in shapes["unet"].items()
               if path[-1] == "kernel" and len(path) >= 3 and path[-3] in ("attn1", "attn2")
               and path[-2] in ("query", "key", "value", "proj_attn")}
    assert len(adapted) == 4 * 2 * 4  # 4 transformer blocks (down 1, mid 1, up 2) x attn1/attn2 x q, k, v, out
    trained = sum(4 * (shape[0] + shape[1]) for shape in adapted.values())
    assert step["trained_params"] == trained
    assert step["shapes"]["params_bytes"] == step["shapes"]["ema_bytes"] == 4 * trained
    # The frozen UNet joins the frozen models, in bf16.
    frozen = sum(tree_bytes(shapes[name], 2) for name in ("unet", "vae_encoder", "text_encoder"))
    assert step["shapes"]["frozen_bytes"] == frozen + HYPERPARAMETER_BYTES


def test_a_batch_that_does_not_fit_shows_the_compiler_line_and_exits_3(pipeline_dir):
    # --compilation_cache_dir none: compiled every time (nothing kept from an earlier run), the compiler's own line
    done = run_aot(pipeline_dir, "--train_batch_size", "20000", "--compilation_cache_dir", "none", json_output=False)
    assert done.returncode == 3, done.stderr
    lines = done.stdout.splitlines()
    exhausted = [line for line in lines if "RESOURCE_EXHAUSTED" in line]
    assert len(exhausted) == 1 and "exceeds available HBM (15.48G)" in exhausted[0]
    assert "DOES NOT FIT" in exhausted[0]
    assert lines[-1] == "result: DOES NOT FIT on a v3-8"
    assert "batch 20000 per device (160000 global) at 32 px" in done.stdout


def test_the_same_flags_again_answer_from_what_was_measured(pipeline_dir, replicated):
    """aot keeps what it measured of each compiled program in aot_reports/ of the compilation cache folder (the
    suite's, T2I_FLAX_COMPILATION_CACHE): the replicated run's flags again give the same report without compiling."""
    done = run_aot(pipeline_dir, "--train_batch_size", str(BATCH))
    assert done.returncode == 0, done.stderr
    again = json.loads(done.stdout)
    assert again["train_step"]["from_cache"]
    same = lambda result: dict(result, train_step=dict(result["train_step"], from_cache=None))  # noqa: E731
    assert same(again) == same(replicated)
    assert os.listdir(os.path.join(os.environ["T2I_FLAX_COMPILATION_CACHE"], "aot_reports"))
    from t2i_flax.aot import report

    line = f"measured when it compiled in {replicated['train_step']['compile_s']} s (kept in the compilation cache"
    assert line in report.report_text(again)


def test_what_aot_keeps_is_keyed_by_the_program_topology_versions_and_compiler_flags(tmp_path, monkeypatch):
    from t2i_flax.aot import cache

    kept = cache.MeasureCache(str(tmp_path), "v3:2x2")
    key = kept.key("module @step {}")
    assert kept.get(key) is None
    kept.put(key, {"fits": True, "memory": {"temp_bytes": 7}})
    assert cache.MeasureCache(str(tmp_path), "v3:2x2").get(key) == {"fits": True, "memory": {"temp_bytes": 7}}
    assert kept.key("module @step {}") == key
    assert kept.key("module @step_2 {}") != key
    assert cache.MeasureCache(str(tmp_path), "v4:2x2x1").key("module @step {}") != key
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_tpu_enable_latency_hiding_scheduler=false")
    assert kept.key("module @step {}") != key
    # off (--compilation_cache_dir none), or a folder that cannot be written: nothing kept, nothing fails
    assert cache.MeasureCache(None, "v3:2x2").get(key) is None
    (tmp_path / "a_file").write_text("")
    unwritable = cache.MeasureCache(str(tmp_path / "a_file"), "v3:2x2")
    unwritable.put(key, {"fits": True})
    assert unwritable.get(key) is None


@pytest.mark.parametrize("flags, message", [
    (["--topology", "v9-8"], "error: --topology 'v9-8' is not one of: v3-8, v4-8, v5e-8"),
    (["--fsdp", "3"], "error: --fsdp 3 must divide the device count 8"),
    (["--gradient_checkpointing"], "error: --gradient_checkpointing: the JAX/Flax trainer has no gradient"),
    (["--learning-rate", "1"], "error: unrecognized arguments: --learning-rate 1"),
])
def test_bad_flags_are_one_line_with_exit_2(pipeline_dir, flags, message):
    done = run_aot(pipeline_dir, *flags)
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(message), done.stderr


def test_without_libtpu_the_error_says_what_to_install(monkeypatch, capsys):
    """What jax raises when libtpu is not installed becomes the one line with the pip command (exit 2)."""
    from jax.experimental import topologies

    from t2i_flax import aot, errors

    def no_libtpu(**kwargs):
        raise RuntimeError("Unable to initialize backend 'tpu': TPU support not installed")

    monkeypatch.setattr(topologies, "get_topology_desc", no_libtpu)
    with pytest.raises(aot.NeedsLibtpu) as raised:
        aot.topology_devices(aot.resolve_topology("v3-8"))
    assert str(raised.value) == "t2i_flax.aot needs libtpu, the TPU compiler (no TPU): pip install libtpu==0.0.42.1"
    assert errors.report(raised.value) == 2
    assert capsys.readouterr().err == f"error: {raised.value}\n"


def test_a_program_the_compiler_placed_over_the_sum_of_its_buffers_is_reported_as_tight():
    """The report's sum (arguments + outputs - aliased + temporaries) is an upper bound: the compiler may place
    temporaries in dead buffers, so a compiled program can add up to more than the usable HBM (measured: SDXL with
    EMA on a v5e-8, 786 MiB over). That is a fit without margin, never 'fits (-786 MiB headroom)'."""
    from t2i_flax.aot import report

    gib = 2 ** 30
    memory = {"argument_bytes": 5 * gib, "output_bytes": 4 * gib, "alias_bytes": 4 * gib, "temp_bytes": 11 * gib,
              "total_bytes": 16 * gib}
    over, = report._memory_lines({"memory": memory}, usable=15 * gib)
    assert "fits only because the compiler reuses dead buffers: the sum is 1.00 GiB over" in over, over
    under, = report._memory_lines({"memory": memory}, usable=17 * gib)
    assert under.endswith("-> fits (1.00 GiB headroom)"), under


def test_aspect_ratio_buckets_compile_every_bucket_and_report_the_largest(pipeline_dir):
    """aot reads no data: it compiles every bucket the flags allow (here sides of 16 or 32 px with an area of at
    most 24^2: 16x32 and 32x16) and reports, in full, the one that needs the most memory."""
    done = run_aot(pipeline_dir, "--train_batch_size", str(BATCH), "--aspect_ratio_buckets", "--resolution", "24",
                   "--bucket_step", "16", "--min_bucket_resolution", "16", "--max_bucket_resolution", "32")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    table = result["buckets"]
    assert [(b["width"], b["height"]) for b in table] == [(16, 32), (32, 16)]
    assert all(b["fits"] and b["total_bytes"] > 0 for b in table)
    largest = max(table, key=lambda b: b["total_bytes"])
    step = result["train_step"]
    assert step["bucket"] == [largest["width"], largest["height"]]
    assert step["memory"]["total_bytes"] == largest["total_bytes"]
    # the batch it measured is a bucket's: 2 per device x 3 x 16 x 32 float32 pixels, and the token ids
    assert step["shapes"]["batch_bytes"] == BATCH * (3 * 16 * 32 * 4 + TEXT_LENGTH * 4)
