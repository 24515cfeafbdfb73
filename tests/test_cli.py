"""Command-line refusals and bad values: one line on stderr, exit code 2, nothing written."""
import os
import subprocess
import sys

import pytest

from t2i_flax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_args(tmp_path):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    return ["--pretrained_model_name_or_path", str(tmp_path / "model"), "--train_data_dir", str(data),
            "--output_dir", str(tmp_path / "out")]


REFUSED = [
    (["--gradient_checkpointing"], "has no gradient checkpointing"),
    (["--gradient_accumulation_steps", "4"], "has no gradient accumulation"),
    (["--enable_xformers_memory_efficient_attention"], "--attention cudnn"),
    (["--snr_gamma", "5.0"], "Min-SNR weighting is only in the PyTorch script"),
    (["--lora_alpha", "8"], "need --lora_rank"),
    (["--lora_rank", "0"], "--lora_rank must be positive"),
    (["--validation_prompts", "a cat", "--validation_scheduler", "lms"], "'lms' is not one of: ddim, pndm"),
    (["--checkpoints_total_limit", "-1"], "--checkpoints_total_limit must be >= 0"),
    (["--mixed_precision", "fp16"], "use --mixed_precision bf16"),
    (["--mixed_precision", "fp8"], "'fp8' is not one of: no, bf16"),
    (["--lr_scheduler", "cosine_warm"], "'cosine_warm' is not one of: constant"),
    (["--resolution", "500"], "multiple of 8"),
    (["--resolution", "0"], "--resolution must be positive"),
    (["--train_batch_size", "0"], "--train_batch_size must be positive"),
    (["--learning_rate", "-1"], "--learning_rate must be >= 0"),
    (["--adam_beta1", "1.5"], "--adam_beta1 must be in [0, 1)"),
    (["--prediction_type", "sample"], "'sample' is not one of: epsilon, v_prediction"),
    (["--report_to", "comet"], "'comet' is not one of"),
    (["--report_to", "wandb", "--hub_token", "secret"], "log in with `hf auth login`"),
    (["--attention", "flash"], "'flash' is not one of: xla, cudnn"),
    (["--attention", "cudnn"], "--attention cudnn needs --mixed_precision bf16"),
    (["--ema_decay", "1.5"], "--ema_decay must be in (0, 1]"),
    (["--proportion_empty_prompts", "1.5"], "--proportion_empty_prompts 1.5 must be between 0 and 1"),
    (["--caption_tag_dropout", "-0.1"], "--caption_tag_dropout -0.1 must be between 0 and 1"),
    (["--caption_tag_dropout_rate", "2"], "--caption_tag_dropout 2.0 must be between 0 and 1"),
    (["--keep_tokens", "-1"], "--keep_tokens must be >= 0"),
    (["--caption_separator", ""], "--caption_separator must not be empty"),
    (["--image_interpolation_mode", "cubic"], "'cubic' is not one of: bicubic, bilinear, box, hamming, lanczos"),
]


@pytest.mark.parametrize("extra,message", REFUSED)
def test_refusals_are_one_line_with_exit_2(tmp_path, capsys, extra, message):
    assert cli.main(base_args(tmp_path) + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_dataset_source_is_required(tmp_path, capsys):
    args = base_args(tmp_path)
    assert cli.main(args[:2] + args[4:]) == 2
    assert "give --dataset_name or --train_data_dir" in capsys.readouterr().err
    assert cli.main(args[:2] + ["--train_data_dir", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_missing_model_folder_through_the_script(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train_text_to_image_flax.py"), *base_args(tmp_path),
                             "--cpu_devices", "2"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "does not exist" in result.stderr
    assert not (tmp_path / "out").exists()


def test_documented_flags_are_accepted():
    parser = cli.build_parser()
    args = parser.parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "d"])
    defaults = {"revision": None, "variant": None, "from_pt": False, "dataset_config_name": None,
                "image_column": "image", "caption_column": "text", "max_train_samples": None,
                "output_dir": "sd-model-finetuned", "cache_dir": None, "seed": 0, "resolution": 512,
                "center_crop": False, "random_flip": False, "train_batch_size": 16, "num_train_epochs": 100,
                "max_train_steps": None, "learning_rate": 1e-4, "scale_lr": False, "lr_scheduler": "constant",
                "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_weight_decay": 1e-2, "adam_epsilon": 1e-8,
                "max_grad_norm": 1.0, "push_to_hub": False, "hub_token": None, "hub_model_id": None,
                "logging_dir": "logs", "report_to": "tensorboard", "mixed_precision": "no", "local_rank": -1,
                "use_ema": False, "lr_warmup_steps": 500, "prediction_type": None, "noise_offset": 0.0,
                "dataloader_num_workers": 0}
    assert {name: getattr(args, name) for name in defaults} == defaults


def test_push_to_hub_uploads_the_pipeline_and_keeps_the_token_quiet(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from t2i_flax import export

    calls = {}

    class Repo:
        repo_id = "me/sd-shapes"

    def fake_create_repo(repo_id, exist_ok, token):
        calls["create"] = (repo_id, exist_ok, token)
        return Repo()

    def fake_upload_folder(**kwargs):
        calls["upload"] = kwargs

    monkeypatch.setattr(huggingface_hub, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    assert export.push_to_hub(str(tmp_path / "sd-shapes"), None, "hf_token_value") == "me/sd-shapes"
    assert calls["create"] == ("sd-shapes", True, "hf_token_value")
    upload = calls["upload"]
    assert upload["repo_id"] == "me/sd-shapes" and upload["token"] == "hf_token_value"
    assert set(upload["allow_patterns"]) >= {"model_index.json", "unet/*", "vae/*", "text_encoder/*",
                                              "tokenizer/*", "scheduler/*"}
    assert not any(p.startswith(("logs", "metrics", "training_args")) for p in upload["allow_patterns"])
    assert "hf_token_value" not in capsys.readouterr().out


def _truncated_unet_pipeline(pipeline_dir, folder):
    import shutil

    shutil.copytree(pipeline_dir, folder)
    path = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return folder


# (case name, extra flags or a function of (pipeline_dir, dataset_dir, tmp_path) -> flags, message)
BAD_INPUTS = [
    ("unknown flag", ["--learning-rate", "1e-4"], "unrecognized arguments: --learning-rate"),
    ("fsdp does not divide devices", ["--fsdp", "3"], "--fsdp 3 must divide the device count 8"),
    ("output dir is a file", lambda p, d, t: ["--output_dir", str(t / "file.txt")], "is a file, not a folder"),
    ("dataset smaller than a global batch", ["--train_batch_size", "4"],
     "16 usable images, fewer than one global batch (32)"),
    ("wrong image column", ["--image_column", "img"], "--image_column 'img' is not a column of the dataset"),
    ("not a pipeline folder", lambda p, d, t: ["--pretrained_model_name_or_path", d],
     "has no scheduler/scheduler_config.json"),
    ("variant that is not there", ["--variant", "fp16"], "for --variant fp16"),
    ("dataset that cannot be loaded", lambda p, d, t: ["--dataset_name", str(t / "no-such-dataset")],
     "could not load the dataset"),
    ("truncated weights", lambda p, d, t: ["--pretrained_model_name_or_path",
                                           _truncated_unet_pipeline(p, str(t / "cut"))], "is truncated"),
]


@pytest.mark.parametrize("name,extra,message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_through_main_are_one_line_exit_2_nothing_written(pipeline_dir, dataset_dir, tmp_path, capsys,
                                                                     name, extra, message):
    (tmp_path / "file.txt").write_text("not a folder")
    output_dir = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", pipeline_dir, "--train_data_dir", dataset_dir, "--output_dir",
            str(output_dir), "--resolution", "32", "--train_batch_size", "1", "--report_to", "none"]
    argv += extra(pipeline_dir, dataset_dir, tmp_path) if callable(extra) else extra
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own exit for an unknown flag
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    last = err.strip().splitlines()[-1]  # after any progress bars of the dataset loader
    assert last.startswith("error: ") and message in last and err.count("error: ") == 1, err
    assert "Traceback" not in err
    assert not output_dir.exists() and (tmp_path / "file.txt").read_text() == "not a folder"
