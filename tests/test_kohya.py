"""kohya-ss LoRA files (t2i_flax/kohya.py): written by `--lora_format kohya`, read by `generate --lora`. diffusers'
`load_lora_weights` (which converts kohya files) fuses our kohya file into the same UNet as our PEFT file, for
tiny SD 1.x and SDXL pipelines made with the PyTorch classes; our loader reads both files into the same adapters."""
import dataclasses
import os

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from t2i_flax import cli, errors, lora, lora_files, trainable
from t2i_flax.config import LoraConfig
from t2i_flax.family import detect

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
RANK, ALPHA = 4, 2.0


@pytest.fixture(scope="module")
def folders(torch_pipeline_dir, torch_sdxl_pipeline_dir):
    return {"sd1": torch_pipeline_dir, "sdxl": torch_sdxl_pipeline_dir}


def random_adapters(unet_abstract, seed):
    params = lora.init_lora_params(jax.random.PRNGKey(seed), unet_abstract, RANK, TARGETS)
    generator = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: generator.standard_normal(np.shape(x)).astype(np.float32) * 0.1, params)


def write_both(kind, folder, out):
    modules = detect(folder).modules(folder, np.float32)
    abstract = modules.unet.abstract_params()
    params = random_adapters(abstract, seed=1 if kind == "sd1" else 2)
    dirs = {}
    for lora_format in ("peft", "kohya"):
        dirs[lora_format] = str(out / lora_format)
        lora_files.save_lora_weights(dirs[lora_format], params, RANK, ALPHA, TARGETS, lora_format, abstract,
                                     sdxl=kind == "sdxl")
    return params, abstract, dirs


def fused_unet(kind, folder, lora_dir):
    import diffusers

    cls = diffusers.StableDiffusionXLPipeline if kind == "sdxl" else diffusers.StableDiffusionPipeline
    pipeline = cls.from_pretrained(folder)
    pipeline.load_lora_weights(lora_dir)
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()  # the fused weights stay, the adapter layers go
    return {key: value.clone() for key, value in pipeline.unet.state_dict().items()}


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_diffusers_fuses_our_kohya_file_as_our_peft_file(kind, folders, tmp_path):
    params, abstract, dirs = write_both(kind, folders[kind], tmp_path)
    keys = sorted(load_file(os.path.join(dirs["kohya"], lora_files.LORA_WEIGHTS_NAME)))
    assert all(key.startswith("lora_unet_") for key in keys)
    assert len(keys) == 3 * len(lora.adapters(params))  # down, up, alpha per module
    # SD 1.x: diffusers module paths; SDXL: the original UNet's, as kohya sd-scripts writes them
    example = ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" if kind == "sd1" else
               "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q")
    assert f"{example}.lora_down.weight" in keys, keys[:5]
    from_peft = fused_unet(kind, folders[kind], dirs["peft"])
    from_kohya = fused_unet(kind, folders[kind], dirs["kohya"])
    import diffusers

    base = diffusers.UNet2DConditionModel.from_pretrained(folders[kind], subfolder="unet").state_dict()
    changed = [key for key in base if not torch.equal(base[key], from_peft[key])]
    assert len(changed) == len(lora.adapters(params))  # every adapted layer, nothing else
    for key, tensor in from_peft.items():
        assert torch.equal(from_kohya[key], tensor), key

    # our loader: both files -> the same adapters and scale
    ours = {fmt: lora_files.load_lora_weights(dirs[fmt], abstract) for fmt in dirs}
    assert ours["kohya"][1].key_style == "kohya" and ours["kohya"][1].scale == ours["peft"][1].scale == ALPHA / RANK
    flat = {fmt: dict(jax.tree_util.tree_leaves_with_path(ours[fmt][0])) for fmt in ours}
    assert flat["kohya"].keys() == flat["peft"].keys()
    for path, value in flat["peft"].items():
        assert np.asarray(flat["kohya"][path]).tobytes() == np.asarray(value).tobytes()


def test_kohya_files_name_what_cannot_be_applied(folders, tmp_path):
    from safetensors.numpy import save_file

    abstract = detect(folders["sd1"]).modules(folders["sd1"], np.float32).unet.abstract_params()
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    pair = {f"{name}.lora_down.weight": np.zeros((4, 32), np.float32),
            f"{name}.lora_up.weight": np.zeros((32, 4), np.float32)}
    cases = [({**pair, "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.zeros((4, 32))},
              "holds text-encoder adapters (1 tensor, e.g. lora_te_text_model_encoder_layers_0_mlp_fc1"),
             ({**pair, f"{name}.dora_scale": np.zeros((1, 32), np.float32)}, "holds DoRA scales (1 tensor"),
             ({**pair, "lora_unet_down_blocks_7_attn1_to_q.lora_down.weight": np.zeros((4, 32), np.float32)},
              "adapts 1 module this UNet does not have (lora_unet_down_blocks_7_attn1_to_q)")]
    for tensors, message in cases:
        path = str(tmp_path / "bad.safetensors")
        save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, path)
        with pytest.raises(errors.ModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
            lora_files.load_lora_weights(path, abstract)


def test_the_trainer_writes_kohya_keys_with_lora_format_kohya(folders, tmp_path, capsys):
    """trainable.LoraAdapters.export with --lora_format kohya (what the end of training and `export --checkpoint
    --lora_format kohya` call); the flag needs --lora_rank."""
    modules = detect(folders["sdxl"]).modules(folders["sdxl"], np.float32)
    adapters = trainable.LoraAdapters(LoraConfig(lora_rank=RANK, lora_format="kohya"), seed=0)
    params = adapters.initial_params(modules.unet, None)

    @dataclasses.dataclass
    class Writer:
        output_dir: str
        unet: object
        family: object

    what = adapters.export(Writer(str(tmp_path), modules.unet, detect(folders["sdxl"])), params)
    assert what == "LoRA adapters (pytorch_lora_weights.safetensors, kohya keys)"
    keys = load_file(str(tmp_path / lora_files.LORA_WEIGHTS_NAME))
    assert all(key.startswith("lora_unet_input_blocks_") or key.startswith("lora_unet_middle_block_")
               or key.startswith("lora_unet_output_blocks_") for key in keys)
    argv = ["--pretrained_model_name_or_path", folders["sd1"], "--train_data_dir", str(tmp_path), "--output_dir",
            str(tmp_path / "out")]
    assert cli.main(argv + ["--lora_format", "kohya"]) == errors.EXIT_USAGE
    assert "--lora_format need --lora_rank" in capsys.readouterr().err
    assert cli.main(argv + ["--lora_rank", "4", "--lora_format", "lycoris"]) == errors.EXIT_USAGE
    assert "'lycoris' is not one of: peft, kohya" in capsys.readouterr().err
    from t2i_flax import export

    assert export.main(["--pipeline", folders["sd1"], "--output_dir", str(tmp_path / "x"), "--single_file",
                        "--lora_format", "kohya"]) == errors.EXIT_USAGE
    assert "--lora_format needs --checkpoint" in capsys.readouterr().err
