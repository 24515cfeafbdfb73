"""Training from a single-file checkpoint (t2i_flax/single_file.py) end to end: one short run on the tiny pipeline
as one file, exported as a folder and as one file, and exported again from its checkpoint."""
import os

from t2i_flax import cli, export, single_file


def test_train_from_a_single_file_at_lr_0_exports_the_same_file(pipeline_dir, dataset_dir, tmp_path):
    """The tiny pipeline as one float32 file trains (lr 0, the flags of test_train.py's lr-0 run) to an export
    whose folder is the base folder's tensors and whose single file is the input file, bit for bit."""
    from safetensors.numpy import load_file

    from conftest import RESOLUTION

    source = str(tmp_path / "base.safetensors")
    single_file.write_single_file(pipeline_dir, source, "float32")
    output_dir = str(tmp_path / "tuned")
    argv = ["--pretrained_model_name_or_path", source, "--single_file_config", pipeline_dir,
            "--train_data_dir", dataset_dir, "--output_dir", output_dir, "--resolution", str(RESOLUTION),
            "--train_batch_size", "1", "--center_crop", "--random_flip", "--seed", "3", "--learning_rate", "0",
            "--use_ema", "--max_train_steps", "2", "--report_to", "none", "--export_single_file",
            "--export_dtype", "float32"]
    assert cli.main(argv) == 0
    for component in ("unet", "vae", "text_encoder"):
        name = "model.safetensors" if component == "text_encoder" else "diffusion_pytorch_model.safetensors"
        before = load_file(os.path.join(pipeline_dir, component, name))
        after = load_file(os.path.join(output_dir, component, name))
        assert sorted(before) == sorted(after)
        assert all(after[k].tobytes() == v.tobytes() for k, v in before.items()), component
    before, after = load_file(source), load_file(os.path.join(output_dir, "tuned.safetensors"))
    assert sorted(before) == sorted(after) and len(before) > 300
    assert all(after[k].tobytes() == v.tobytes() for k, v in before.items())
    card = open(os.path.join(output_dir, "README.md")).read()
    assert f"base_model: {source}" in card and f"`{source}`" in card
    # the export command on the run's checkpoint: the base model (a single file) found again from the run record
    again = str(tmp_path / "again")
    assert export.main(["--checkpoint", os.path.join(output_dir, "checkpoints", "2"), "--output_dir", again,
                        "--single_file", "--export_dtype", "float32"]) == 0
    assert load_file(os.path.join(again, "again.safetensors")).keys() == before.keys()
    assert all(load_file(os.path.join(again, "again.safetensors"))[k].tobytes() == v.tobytes()
               for k, v in before.items())
