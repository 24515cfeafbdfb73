"""Weight naming and files: the PyTorch <-> legacy Flax naming rule, safetensors round trips, sharded and
variant files, clear errors, and the Hub loader against an offline cache."""
import json
import os
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from t2i_flax import hub, weights
from t2i_flax.errors import ModelError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def reference_names():
    """{model: (torch {key: shape}, legacy flax {path: shape})} from diffusers 0.39 / transformers 4.57."""
    tables = {}
    with open(os.path.join(FIXTURES, "legacy_param_paths.txt")) as handle:
        for line in handle:
            if line.startswith("#") or not line.strip():
                continue
            model, kind, name, shape = line.rstrip("\n").split("\t")
            torch_names, flax_names = tables.setdefault(model, ({}, {}))
            (torch_names if kind == "torch" else flax_names)[name] = tuple(json.loads(shape))
    return tables


class Shape:
    def __init__(self, shape):
        self.shape = shape


@pytest.mark.parametrize("model", ["unet_sd1", "unet_sd2", "vae", "clip"])
def test_naming_rule_matches_legacy_flax_names(model):
    torch_names, flax_names = reference_names()[model]
    legacy = {tuple(weights.LEGACY_FLAX_ALIASES.get(n, n) for n in path.split("/")): shape
              for path, shape in flax_names.items()}
    abstract = weights.unflatten({path: Shape(shape) for path, shape in legacy.items()})
    state_dict = {key: np.zeros(shape, np.float32) for key, shape in torch_names.items()}
    params = weights.state_dict_to_params(state_dict, abstract)
    assert {p: v.shape for p, v in weights.flatten(params).items()} == legacy
    # and back: every flax path names exactly its torch key with the torch shape
    back = weights.params_to_state_dict(params)
    assert {k: v.shape for k, v in back.items()} == {k: v for k, v in torch_names.items() if "position_ids" not in k}


def random_tree(seed=0):
    rng = np.random.default_rng(seed)
    return {"conv_in": {"kernel": rng.normal(size=(3, 3, 4, 8)).astype(np.float32),
                        "bias": rng.normal(size=8).astype(np.float32)},
            "down_blocks_0": {"attentions_1": {"transformer_blocks_0": {"attn1": {
                "query": {"kernel": rng.normal(size=(8, 16)).astype(np.float32)},
                "proj_attn": {"kernel": rng.normal(size=(16, 8)).astype(np.float32),
                              "bias": rng.normal(size=8).astype(np.float32)}}}},
                "resnets_0": {"norm1": {"scale": rng.normal(size=8).astype(np.float32),
                                        "bias": rng.normal(size=8).astype(np.float32)}}},
            "time_embedding": {"linear_1": {"kernel": rng.normal(size=(8, 32)).astype(np.float32)}},
            "text_model": {"embeddings": {"token_embedding": {"embedding": rng.normal(size=(50, 8)).astype(np.float32)}},
                           "encoder": {"layers": {"3": {"mlp": {"fc1": {"kernel": rng.normal(size=(8, 4))
                                                                        .astype(np.float32)}}}}}}}


def abstract_of(tree):
    return weights.unflatten({p: Shape(v.shape) for p, v in weights.flatten(tree).items()})


def test_torch_names_and_layouts():
    state_dict = weights.params_to_state_dict(random_tree())
    assert sorted(state_dict) == sorted([
        "conv_in.weight", "conv_in.bias", "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight",
        "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.bias",
        "down_blocks.0.resnets.0.norm1.weight", "down_blocks.0.resnets.0.norm1.bias",
        "time_embedding.linear_1.weight", "text_model.embeddings.token_embedding.weight",
        "text_model.encoder.layers.3.mlp.fc1.weight"])
    tree = random_tree()
    np.testing.assert_array_equal(state_dict["conv_in.weight"], tree["conv_in"]["kernel"].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(state_dict["time_embedding.linear_1.weight"],
                                  tree["time_embedding"]["linear_1"]["kernel"].T)
    np.testing.assert_array_equal(state_dict["text_model.embeddings.token_embedding.weight"],
                                  tree["text_model"]["embeddings"]["token_embedding"]["embedding"])


def test_safetensors_round_trip_is_bit_exact(tmp_path):
    tree = random_tree()
    weights.save_params(str(tmp_path), "model.safetensors", tree)
    loaded = weights.load_params(str(tmp_path), "model.safetensors", None, abstract_of(tree))
    for path, value in weights.flatten(tree).items():
        got = weights.flatten(loaded)[path]
        assert got.dtype == np.float32 and got.tobytes() == value.tobytes(), path


def test_sharded_and_variant_files(tmp_path):
    tree = random_tree()
    state_dict = weights.params_to_state_dict(tree)
    keys = sorted(state_dict)
    shards = {"diffusion_pytorch_model.fp16-00001-of-00002.safetensors": keys[:4],
              "diffusion_pytorch_model.fp16-00002-of-00002.safetensors": keys[4:]}
    weight_map = {}
    for file, names in shards.items():
        save_file({k: state_dict[k].astype(np.float16) for k in names}, str(tmp_path / file))
        weight_map.update({k: file for k in names})
    with open(tmp_path / "diffusion_pytorch_model.safetensors.index.fp16.json", "w") as handle:
        json.dump({"metadata": {}, "weight_map": weight_map}, handle)
    loaded = weights.load_params(str(tmp_path), "diffusion_pytorch_model.safetensors",
                                 "diffusion_flax_model.msgpack", abstract_of(tree), variant="fp16")
    for path, value in weights.flatten(tree).items():
        got = weights.flatten(loaded)[path]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, value.astype(np.float16).astype(np.float32))
    with pytest.raises(weights.WeightsError, match="has no diffusion_pytorch_model.safetensors but has variant weights: pass --variant fp16"):
        weights.load_params(str(tmp_path), "diffusion_pytorch_model.safetensors", None, abstract_of(tree))


def test_mismatched_tensors_are_named(tmp_path):
    tree = random_tree()
    state_dict = weights.params_to_state_dict(tree)
    del state_dict["conv_in.bias"]
    state_dict["extra_block.weight"] = np.zeros(3, np.float32)
    state_dict["time_embedding.linear_1.weight"] = np.zeros((5, 8), np.float32)
    save_file(state_dict, str(tmp_path / "model.safetensors"))
    with pytest.raises(weights.WeightsError) as error:
        weights.load_params(str(tmp_path), "model.safetensors", None, abstract_of(tree))
    message = str(error.value)
    assert "missing tensors: conv_in.bias" in message
    assert "unexpected tensors: extra_block.weight" in message
    assert "time_embedding.linear_1.weight (5, 8) (expected (8, 32)" in message
    assert "\n" not in message


def test_truncated_or_foreign_weight_files_are_model_errors(tmp_path):
    """A download cut short or a file that is not what its name says: one-line ModelErrors, not numpy or
    msgpack exceptions."""
    tree = random_tree()
    save_file(weights.params_to_state_dict(tree), str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelError, match=r"model.safetensors is truncated: tensor .* the file ends before"):
        weights.load_params(str(tmp_path), "model.safetensors", None, abstract_of(tree))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelError, match="is not a safetensors file"):
        weights.load_params(str(tmp_path), "model.safetensors", None, abstract_of(tree))
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "flax_model.msgpack").write_bytes(b"\xc1 not msgpack")
    with pytest.raises(ModelError, match="is not a readable msgpack file"):
        weights.load_params(str(tmp_path), "model.safetensors", "flax_model.msgpack", abstract_of(tree))


@pytest.mark.parametrize("header_length", [2**40, 2**64 - 1, "cut"])
def test_a_header_length_beyond_the_end_of_the_file_is_a_model_error(tmp_path, header_length):
    """The first 8 bytes of a safetensors file are its header's length: one beyond the file's end (a download cut
    inside the header, another kind of file) is a one-line ModelError, found before any memory is allocated."""
    path = tmp_path / "model.safetensors"
    if header_length == "cut":
        save_file(weights.params_to_state_dict(random_tree()), str(path))
        data = path.read_bytes()
        header_length = int.from_bytes(data[:8], "little")
        path.write_bytes(data[: 8 + header_length - 1])
    else:
        path.write_bytes(header_length.to_bytes(8, "little") + b'{"a": 1}')
    size = path.stat().st_size
    with pytest.raises(ModelError, match=rf"^{re.escape(str(path))} is truncated or not a safetensors file: its header "
                                         rf"length {header_length} does not fit the file's {size} bytes$"):
        weights.read_safetensors(str(path))


def test_pickle_only_and_empty_folders_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(weights.WeightsError, match="never unpickles.*convert them to safetensors"):
        weights.load_params(str(tmp_path), "model.safetensors", "flax_model.msgpack", {})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(weights.WeightsError, match="no weights in .*expected model.safetensors"):
        weights.load_params(str(empty), "model.safetensors", None, {})
    with pytest.raises(hub.ModelNotFoundError, match="does not exist"):
        hub.resolve_model_dir(str(tmp_path / "nowhere"))
    with pytest.raises(hub.ModelNotFoundError, match="has no 'unet' folder"):
        hub.resolve_model_dir(str(tmp_path), subfolder="unet")


def make_offline_cache(cache_dir, repo_id, files: dict, revision_name="main"):
    """Lays out a Hugging Face cache as huggingface_hub writes it (refs -> snapshot)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", revision_name), "w") as handle:
        handle.write(commit)
    for name, source in files.items():
        target = os.path.join(repo, "snapshots", commit, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(source, target)
    return os.path.join(repo, "snapshots", commit)


def test_hub_repo_id_resolves_from_offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tree = random_tree()
    source = tmp_path / "src"
    weights.save_params(str(source), "diffusion_pytorch_model.safetensors", tree)
    (source / "config.json").write_text("{}")
    cache = tmp_path / "cache"
    snapshot = make_offline_cache(str(cache), "someone/tiny-sd", {
        "unet/diffusion_pytorch_model.safetensors": str(source / "diffusion_pytorch_model.safetensors"),
        "unet/config.json": str(source / "config.json")}, revision_name="flax")
    folder = hub.resolve_model_dir("someone/tiny-sd", subfolder="unet", revision="flax", cache_dir=str(cache))
    assert os.path.samefile(folder, os.path.join(snapshot, "unet"))
    loaded = weights.load_params(folder, "diffusion_pytorch_model.safetensors", None, abstract_of(tree))
    assert weights.flatten(loaded)[("conv_in", "kernel")].tobytes() == tree["conv_in"]["kernel"].tobytes()
    with pytest.raises(hub.ModelNotFoundError, match="not in the local Hugging Face cache"):
        hub.resolve_model_dir("someone/other-model", cache_dir=str(cache))


def test_bfloat16_and_float16_safetensors_read_exactly(tmp_path):
    import torch
    from safetensors.torch import save_file as save_torch_file

    generator = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(3, 5, generator=generator).to(torch.bfloat16),
               "b.weight": torch.randn(4, generator=generator).to(torch.float16),
               "c.bias": torch.randn(2, 2, 3, 3, generator=generator)}
    save_torch_file(tensors, str(tmp_path / "x.safetensors"))
    read = weights.read_safetensors(str(tmp_path / "x.safetensors"))
    for key, tensor in tensors.items():
        assert read[key].shape == tuple(tensor.shape)
        np.testing.assert_array_equal(read[key].astype(np.float32), tensor.float().numpy())


def test_hub_download_asks_only_for_what_training_needs(tmp_path, monkeypatch):
    """A pipeline repo: configs, tokenizer and safetensors of the five components, never the safety checker
    or pickles; with --variant, only that variant's weights."""
    import fnmatch

    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns, **kwargs):
        calls.append(allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    for variant in (None, "fp16"):
        calls.clear()
        hub.resolve_model_dir("org/model", variant=variant, local_files_only=False)
        patterns = calls[0]
        wanted = lambda path: any(fnmatch.fnmatchcase(path, p) for p in patterns)  # noqa: E731
        suffix = ".fp16" if variant else ""
        for path in ("model_index.json", "unet/config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                     "scheduler/scheduler_config.json", f"unet/diffusion_pytorch_model{suffix}.safetensors",
                     f"vae/diffusion_pytorch_model{suffix}.safetensors", f"text_encoder/model{suffix}.safetensors",
                     f"unet/diffusion_pytorch_model{suffix}-00001-of-00002.safetensors"):
            assert wanted(path), path
        for path in ("safety_checker/model.safetensors", "unet/diffusion_pytorch_model.bin",
                     "text_encoder/pytorch_model.bin", "unet/diffusion_pytorch_model.non_ema.safetensors"):
            assert not wanted(path), path
        other = "" if variant else ".fp16"
        assert not wanted(f"unet/diffusion_pytorch_model{other}.safetensors")
