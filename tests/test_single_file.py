"""Single-file checkpoints (t2i_flax/single_file.py), in and out, for tiny SD 1.x, SD 2.x and SDXL pipelines made
with the PyTorch classes. diffusers' `from_single_file(path, config=<folder>)` is the oracle of both directions;
its own conversion functions, run on a file whose every tensor carries a distinct marker, give the key set a file
must have (diffusers cannot write one); what diffusers is lenient about (4-D VAE attention, where the upsampler
sits, OpenCLIP keys) is checked by name."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from t2i_flax import cli, errors, export, generate, hub, single_file, weights
from t2i_flax.family import detect

from test_weights import make_offline_cache

KINDS = ("sd1", "sd2", "sdxl")
PIPELINE_CLASSES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                    "sdxl": "StableDiffusionXLPipeline"}
TEXT_PREFIX = {"sd1": "cond_stage_model.transformer.", "sd2": "cond_stage_model.model.",
               "sdxl": "conditioner.embedders.0.transformer."}


@pytest.fixture(scope="module")
def folders(torch_pipeline_dir, torch_sd2_pipeline_dir, torch_sdxl_pipeline_dir):
    return {"sd1": torch_pipeline_dir, "sd2": torch_sd2_pipeline_dir, "sdxl": torch_sdxl_pipeline_dir}


@pytest.fixture(scope="module")
def files(folders, tmp_path_factory):
    """Each tiny pipeline written as one float32 single file by t2i_flax."""
    out = tmp_path_factory.mktemp("single-files")
    paths = {}
    for kind, folder in folders.items():
        paths[kind] = str(out / f"tiny-{kind}.safetensors")
        written = single_file.write_single_file(folder, paths[kind], "float32")
        assert written["kind"] == kind
    return paths


def components(pipeline):
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return {name: getattr(pipeline, name) for name in names if getattr(pipeline, name, None) is not None}


def diffusers_pipelines(kind, folder, path=None, dtype=None):
    import diffusers

    cls = getattr(diffusers, PIPELINE_CLASSES[kind])
    if path is None:
        return cls.from_pretrained(folder)
    return cls.from_single_file(path, config=folder, local_files_only=True, torch_dtype=dtype)


def read_torch(path):
    from safetensors.torch import load_file

    return load_file(path)


@pytest.mark.parametrize("kind", KINDS)
def test_folder_to_our_single_file_to_diffusers_equals_the_folder(kind, folders, files):
    """float32: every tensor of every component bit for bit, the key sets equal."""
    reference = components(diffusers_pipelines(kind, folders[kind]))
    loaded = components(diffusers_pipelines(kind, folders[kind], files[kind]))
    assert sorted(loaded) == sorted(reference)
    for name, model in reference.items():
        want, got = model.state_dict(), loaded[name].state_dict()
        assert sorted(got) == sorted(want), name
        for key, tensor in want.items():
            assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), f"{name}/{key}"


@pytest.mark.parametrize("kind, dtype", [("sd1", "float16"), ("sdxl", "bfloat16")])
def test_half_precision_export_is_the_folder_rounded(kind, dtype, folders, tmp_path):
    path = str(tmp_path / "half.safetensors")
    single_file.write_single_file(folders[kind], path, dtype)
    torch_dtype = getattr(torch, dtype)
    assert {tensor.dtype for tensor in read_torch(path).values()} == {torch_dtype}
    reference = components(diffusers_pipelines(kind, folders[kind]))
    loaded = components(diffusers_pipelines(kind, folders[kind], path, torch_dtype))
    for name, model in reference.items():
        got = loaded[name].state_dict()
        for key, tensor in model.state_dict().items():
            assert torch.equal(got[key], tensor.to(torch_dtype)), f"{name}/{key}"


def with_real_file_extras(kind, path, out_path):
    """The file with what real ones carry besides the pipeline: DDPM buffers, model_ema.*, CLIP's int64
    position_ids, OpenCLIP's logit_scale, SD 2.x's text projection and one more OpenCLIP block than the text encoder
    uses (SD 2.x's 24th)."""
    from safetensors.torch import save_file

    tensors = read_torch(path)
    generator = torch.Generator().manual_seed(1)
    tensors.update({"betas": torch.linspace(1e-4, 2e-2, 1000), "alphas_cumprod": torch.rand(1000, generator=generator),
                    "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7),
                    "model_ema.diffusion_modelout0weight": torch.ones(4)})
    clip_prefix = "conditioner.embedders.0.transformer." if kind == "sdxl" else "cond_stage_model.transformer."
    if kind != "sd2":
        tensors[clip_prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    if kind == "sd2":
        prefix = "cond_stage_model.model."
        tensors[prefix + "logit_scale"] = torch.tensor(4.6)
        tensors[prefix + "text_projection"] = torch.randn(24, 24, generator=generator)
        for key in [k for k in tensors if k.startswith(prefix + "transformer.resblocks.1.")]:
            tensors[key.replace("resblocks.1.", "resblocks.2.")] = torch.randn(tensors[key].shape, generator=generator)
    if kind == "sdxl":
        tensors["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6)
    save_file(tensors, out_path)
    return out_path


def our_params(model_dir):
    _, params = detect(model_dir).load(model_dir, np.float32)
    return params


def torch_to_our_params(models, abstract):
    return {name: weights.state_dict_to_params({k: v.float().numpy() for k, v in model.state_dict().items()},
                                               abstract[name])
            for name, model in models.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_a_single_file_loads_as_diffusers_from_single_file_loads_it(kind, folders, files, tmp_path):
    """A file with real files' extras (ignored, as diffusers ignores them), as a float16 file too: our loader
    reads every tensor diffusers' from_single_file reads, exactly."""
    import jax

    path = with_real_file_extras(kind, files[kind], str(tmp_path / f"{kind}.safetensors"))
    half = str(tmp_path / f"{kind}-fp16.safetensors")
    single_file.write_single_file(folders[kind], half, "float16")
    for source in (path, half):
        model_dir = hub.resolve_model_dir(source, single_file_config=folders[kind])
        assert detect(model_dir) is detect(folders[kind])
        ours = our_params(model_dir)
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.float32), ours)
        reference = torch_to_our_params(components(diffusers_pipelines(kind, folders[kind], source)), abstract)
        assert sorted(ours) == sorted(reference)
        for name in ours:
            flat_ours, flat_ref = weights.flatten(ours[name]), weights.flatten(reference[name])
            for leaf, value in flat_ref.items():
                assert flat_ours[leaf].tobytes() == value.tobytes(), f"{name}/{'/'.join(leaf)}"
        # the second time is read from the cache, not converted again
        assert hub.resolve_model_dir(source, single_file_config=folders[kind]) == model_dir
    if kind == "sd1":  # float32 file -> the folder's own tensors: the round trip is the identity
        ours = our_params(hub.resolve_model_dir(path, single_file_config=folders[kind]))
        base = our_params(folders[kind])
        for name in base:
            for leaf, value in weights.flatten(base[name]).items():
                assert weights.flatten(ours[name])[leaf].tobytes() == value.tobytes()


def marked(path):
    """The file's tensors, each filled with its own index (float64: exact), and {index: key}."""
    tensors = read_torch(path)
    keys = sorted(tensors)
    return {key: torch.full(tensors[key].shape, float(i), dtype=torch.float64) for i, key in enumerate(keys)}, keys


def diffusers_conversion(kind, checkpoint, folder):
    """diffusers' own single-file conversion of each component: {component: {diffusers key: tensor}}."""
    from diffusers.loaders import single_file_utils as utils

    configs = {name: json.load(open(os.path.join(folder, name, "config.json")))
               for name in ("unet", "vae", "text_encoder", "text_encoder_2")
               if os.path.isdir(os.path.join(folder, name))}
    out = {"unet": utils.convert_ldm_unet_checkpoint(checkpoint, configs["unet"]),
           "vae": utils.convert_ldm_vae_checkpoint(checkpoint, configs["vae"])}

    class Config:
        hidden_size = None

    class TextModel:
        config = Config()

    if kind == "sd2":
        TextModel.config.hidden_size = configs["text_encoder"]["hidden_size"]
        out["text_encoder"] = utils.convert_open_clip_checkpoint(TextModel, checkpoint, prefix="cond_stage_model.model.")
    else:
        out["text_encoder"] = utils.convert_ldm_clip_checkpoint(checkpoint)
    if kind == "sdxl":
        TextModel.config.hidden_size = configs["text_encoder_2"]["hidden_size"]
        out["text_encoder_2"] = utils.convert_open_clip_checkpoint(TextModel, checkpoint,
                                                                   prefix="conditioner.embedders.1.model.")
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_the_key_set_is_what_diffusers_conversion_reads(kind, folders, files):
    """Inverting diffusers' conversion on our file: every tensor diffusers' models need comes from exactly one key
    of the file (q, k and v of one fused OpenCLIP in_proj), and every key of the file is read. Then what diffusers
    does not check: VAE attention 4-D, the upsampler after the attention, OpenCLIP's fused keys for SD 2.x."""
    checkpoint, keys = marked(files[kind])
    converted = diffusers_conversion(kind, checkpoint, folders[kind])
    reference = components(diffusers_pipelines(kind, folders[kind]))
    used = set()
    for name, model in reference.items():
        want = {key.removeprefix("text_model."): tensor for key, tensor in model.state_dict().items()}
        got = {key.removeprefix("text_model."): tensor for key, tensor in converted[name].items()}
        assert sorted(got) == sorted(want), name
        for key, tensor in got.items():
            assert tuple(tensor.shape) == tuple(want[key].shape) or name == "vae", f"{name}/{key}"
            markers = torch.unique(tensor)
            assert len(markers) == 1, f"{name}/{key} mixes tensors of the file"
            used.add(keys[int(markers[0])])
    assert used == set(keys)  # nothing in the file that diffusers does not read

    header = single_file.read_header(files[kind])
    attention = [k for k in header if k.startswith("first_stage_model.") and ".mid.attn_1." in k
                 and k.endswith("weight") and ".norm." not in k]
    assert len(attention) == 8 and all(len(header[k][1]) == 4 and header[k][1][2:] == (1, 1) for k in attention)
    ups = [k for k in header if k.startswith("model.diffusion_model.output_blocks.") and ".conv.weight" in k
           and "transformer" not in k]
    for key in ups:  # output_blocks.N.2.conv after an attention, output_blocks.N.1.conv without
        block = key.split(".")[3]
        has_attention = f"model.diffusion_model.output_blocks.{block}.1.proj_in.weight" in header
        assert key.split(".")[4] == ("2" if has_attention else "1"), key
    assert any(k.startswith(TEXT_PREFIX[kind]) for k in header)
    if kind == "sd2":
        assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in header
        assert not any(k.startswith("cond_stage_model.transformer.") for k in header)
    else:
        assert f"{TEXT_PREFIX[kind]}text_model.embeddings.token_embedding.weight" in header
    if kind == "sdxl":
        assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in header
        assert "conditioner.embedders.1.model.text_projection" in header
        assert "model.diffusion_model.label_emb.0.0.weight" in header


def test_export_command_writes_a_folder_as_one_file(folders, tmp_path, capsys):
    output_dir = str(tmp_path / "my-model")
    assert export.main(["--pipeline", folders["sdxl"], "--output_dir", output_dir, "--single_file",
                        "--export_dtype", "float32"]) == 0
    path = os.path.join(output_dir, "my-model.safetensors")
    assert "my-model.safetensors (SDXL base layout, float32" in capsys.readouterr().out
    ours = single_file.read_header(path)
    assert any(k.startswith("conditioner.embedders.1.model.") for k in ours)
    assert export.main(["--pipeline", folders["sd1"], "--output_dir", output_dir]) == errors.EXIT_USAGE
    assert export.main(["--pipeline", folders["sd1"], "--output_dir", output_dir, "--single_file",
                        "--export_dtype", "int8"]) == errors.EXIT_USAGE
    assert "is not one of: float16, bfloat16, float32" in capsys.readouterr().err


def test_a_hub_file_with_the_default_configs_from_the_offline_cache(folders, files, tmp_path, monkeypatch):
    """`owner/repo/path/file.safetensors` through hf_hub_download, and the kind's default config repo through a
    configs-only snapshot, both from a prepared cache with HF_HUB_OFFLINE=1."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = str(tmp_path / "hub")
    snapshot = make_offline_cache(cache, "someone/tiny-checkpoints", {"models/tiny-sd1.safetensors": files["sd1"]})
    config_files = {}
    for root, _, names in os.walk(folders["sd1"]):
        for name in names:
            if name.endswith((".json", ".txt")):
                full = os.path.join(root, name)
                config_files[os.path.relpath(full, folders["sd1"])] = full
    make_offline_cache(cache, "someone/tiny-sd1-configs", config_files)
    monkeypatch.setitem(single_file.DEFAULT_CONFIGS, "sd1", "someone/tiny-sd1-configs")
    model_dir = hub.resolve_model_dir("someone/tiny-checkpoints/models/tiny-sd1.safetensors", cache_dir=cache)
    ours, base = our_params(model_dir), our_params(folders["sd1"])
    for leaf, value in weights.flatten(base["unet"]).items():
        assert weights.flatten(ours["unet"])[leaf].tobytes() == value.tobytes()

    class ModelConfig:  # what aot reads: the configs only
        pretrained_model_name_or_path = "someone/tiny-checkpoints/models/tiny-sd1.safetensors"
        revision = None
        cache_dir = cache
        single_file_config = None

    config_dir = hub.resolve_config_dir(ModelConfig)
    assert os.path.isfile(os.path.join(config_dir, "unet", "config.json")) and "tiny-sd1-configs" in config_dir
    with pytest.raises(hub.ModelNotFoundError, match="not in the local Hugging Face cache"):
        hub.resolve_model_dir("someone/tiny-checkpoints/models/other.safetensors", cache_dir=cache)
    with pytest.raises(hub.ModelNotFoundError, match="could not get the configs of someone/absent"):
        hub.resolve_model_dir(files["sd1"], cache_dir=cache, single_file_config="someone/absent")

    # The run records the commit the file came from (train.model_commit); a resume asks for that commit, and gets the
    # same file and folder after the branch has moved on to another commit's file.
    from t2i_flax import train

    reference = "someone/tiny-checkpoints/models/tiny-sd1.safetensors"
    commit = os.path.basename(snapshot)
    assert train.model_commit(model_dir) == commit and train.model_commit(files["sd1"]) is None
    newer = "f" * 40
    os.makedirs(os.path.join(os.path.dirname(snapshot), newer, "models"))
    shutil.copy(files["sd1"], os.path.join(os.path.dirname(snapshot), newer, "models", "tiny-sd1.safetensors"))
    with open(os.path.join(os.path.dirname(os.path.dirname(snapshot)), "refs", "main"), "w") as handle:
        handle.write(newer)
    moved_on = hub.resolve_model_dir(reference, cache_dir=cache)
    assert moved_on != model_dir and train.model_commit(moved_on) == newer
    assert hub.resolve_model_dir(reference, revision=commit, cache_dir=cache) == model_dir


def rewritten(path, out, change):
    from safetensors.torch import save_file

    tensors = read_torch(path)
    change(tensors)
    save_file(tensors, out)
    return out


def test_what_a_file_cannot_be_is_one_line(folders, files, tmp_path):
    def fails(path, match, config=folders["sd1"]):
        with pytest.raises(errors.ModelError, match=match):
            hub.resolve_model_dir(str(path), single_file_config=config)

    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x02not really")
    fails(pickle, "is a PyTorch pickle checkpoint: t2i_flax never loads pickles")
    unknown = rewritten(files["sd1"], str(tmp_path / "unknown.safetensors"),
                        lambda t: t.update({"model.diffusion_model.extra_block.weight": torch.ones(2)}))
    fails(unknown, r"unknown tensors: model\.diffusion_model\.extra_block\.weight")
    missing = rewritten(files["sd1"], str(tmp_path / "missing.safetensors"),
                        lambda t: t.pop("first_stage_model.decoder.up.0.block.0.conv1.weight"))
    fails(missing, r"missing tensors: first_stage_model\.decoder\.up\.0\.block\.0\.conv1\.weight")
    fails(files["sd2"], "OpenCLIP text encoder .* hidden_act 'quick_gelu'")  # an SD 2.x file, SD 1.x configs
    fails(files["sdxl"], "is an SDXL base checkpoint but the configs in .* are Stable Diffusion 1.x/2.x's")
    fails(files["sd1"], r"\(does --single_file_config match this file\?\): missing tensors: .*wrongly shaped tensors",
          config=folders["sd2"])
    lora = rewritten(files["sd1"], str(tmp_path / "lora.safetensors"),
                     lambda t: [t.pop(k) for k in list(t) if k.startswith("model.diffusion_model.")])
    fails(lora, "is not a Stable Diffusion single-file checkpoint: it has no model.diffusion_model")
    refiner = rewritten(files["sdxl"], str(tmp_path / "refiner.safetensors"), lambda t: t.update(
        {k.replace("embedders.1.", "embedders.0."): v for k, v in list(t.items()) if "embedders.1." in k}) or [
        t.pop(k) for k in list(t) if "embedders.1." in k or "embedders.0.transformer." in k])
    fails(refiner, "is an SDXL refiner")
    inpainting = rewritten(files["sd1"], str(tmp_path / "inpaint.safetensors"), lambda t: t.update(
        {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)}))
    fails(inpainting, "is an inpainting checkpoint")
    fails(tmp_path / "absent.safetensors", "does not exist")


def test_command_lines_refuse_pickles_and_stray_flags_with_exit_2(folders, files, tmp_path, capsys):
    data = str(tmp_path)
    base = ["--train_data_dir", data, "--output_dir", str(tmp_path / "out")]
    cases = [(["--pretrained_model_name_or_path", str(tmp_path / "model.ckpt")], "never loads pickles"),
             (["--pretrained_model_name_or_path", folders["sd1"], "--single_file_config", folders["sd1"]],
              "--single_file_config needs a single-file checkpoint"),
             (["--pretrained_model_name_or_path", folders["sd1"], "--export_dtype", "bfloat16"],
              "--export_dtype needs --export_single_file"),
             (["--pretrained_model_name_or_path", folders["sd1"], "--export_single_file", "--export_dtype", "fp8"],
              "'fp8' is not one of: float16, bfloat16, float32"),
             (["--pretrained_model_name_or_path", folders["sd1"], "--export_single_file", "--lora_rank", "4"],
              "--export_single_file with --lora_rank needs --lora_merge")]
    for argv, message in cases:
        assert cli.main(argv + base) == errors.EXIT_USAGE
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert generate.main(["--model", str(tmp_path / "x.pt"), "--prompt", "a", "--out", data]) == errors.EXIT_USAGE
    assert "never loads pickles" in capsys.readouterr().err


def test_the_model_card_of_a_hub_single_file_names_its_repo(tmp_path):
    from t2i_flax import model_card

    path = model_card.write_model_card(str(tmp_path), "someone/models/sd15-finetune.safetensors", "data", {}, None,
                                       ["a cat"], lora=True)
    card = open(path).read()
    assert "base_model: someone/models\n" in card
    url = "https://huggingface.co/someone/models/blob/main/sd15-finetune.safetensors"
    assert f"StableDiffusionPipeline.from_single_file(\"{url}\"" in card and f"]({url})" in card


def test_generate_loads_a_single_file_with_its_configs(folders, files):
    """generate's load_pipeline (and so `python -m t2i_flax.generate --model FILE`) reads the converted folder: the
    SD 2.x file with its v-prediction scheduler and tokenizer from --single_file_config."""
    import jax

    pipeline = generate.load_pipeline(files["sd2"], single_file_config=folders["sd2"])
    assert os.path.isfile(os.path.join(pipeline.model_dir, "single_file.json"))
    assert pipeline.scheduler_config["prediction_type"] == "v_prediction"
    assert pipeline.tokenizer("a red circle").input_ids == \
        generate.load_pipeline(folders["sd2"]).tokenizer("a red circle").input_ids
    unet = jax.device_get(pipeline.params["unet"])
    base = our_params(folders["sd2"])["unet"]
    for leaf, value in weights.flatten(base).items():
        assert np.asarray(weights.flatten(unet)[leaf]).tobytes() == value.tobytes()


def test_resume_compares_a_single_file_by_its_real_path(files, folders, tmp_path, monkeypatch):
    """A run resumed with the same file named another way (relative, or through a link) is the same run."""
    from t2i_flax.cli import parse_config

    link = tmp_path / "link.safetensors"
    link.symlink_to(files["sd1"])

    def config(model, single_file_config):
        return parse_config(["--pretrained_model_name_or_path", model, "--single_file_config", single_file_config,
                             "--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")])

    saved = config(files["sd1"], folders["sd1"]).to_dict()
    monkeypatch.chdir(os.path.dirname(folders["sd1"]))
    assert config(str(link), os.path.basename(folders["sd1"])).resume_differences(saved) == []
    assert config(files["sd2"], folders["sd1"]).resume_differences(saved) != []


def test_a_hub_files_kind_from_its_header_alone(files, monkeypatch):
    """What aot reads of a Hub file it has not downloaded: the header, through huggingface_hub's range request."""
    import huggingface_hub

    header = single_file.read_header(files["sdxl"])
    calls = []

    class Info:
        def __init__(self, dtype, shape):
            self.dtype, self.shape = dtype, list(shape)

    def parse(self, repo_id, filename, revision=None, **kwargs):
        calls.append((repo_id, filename, revision))
        return type("Metadata", (), {"tensors": {k: Info(*v) for k, v in header.items()}})()

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.HfApi, "parse_safetensors_file_metadata", parse)
    found = single_file._hub_header("someone/models/sub/xl.safetensors", "v2")
    assert calls == [("someone/models", "sub/xl.safetensors", "v2")] and found == header
    assert single_file.detect_layout(found, "xl").kind == "sdxl"
