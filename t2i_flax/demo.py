"""`make demo`: a tiny random SD pipeline and a synthetic captioned dataset, trained with the real command
line on 8 simulated CPU devices (EMA, warmup schedule, TensorBoard, validation images, a checkpoint), then
exported with its model card. No torch, no network.

    python -m t2i_flax.demo [--workdir demo_output] [--steps 200]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32, attention_head_dim=8,
                 norm_num_groups=32)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=[32, 64],
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32,
                norm_num_groups=32)
TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
SD_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
                "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


def write_tiny_pipeline(folder: str, seed: int = 0, prediction_type: str = "epsilon") -> str:
    """A randomly initialised, SD-shaped tiny pipeline in diffusers format, made with our own classes."""
    import jax

    from t2i_flax import export, tokenizer
    from t2i_flax.models import FlaxAutoencoderKL, FlaxCLIPTextModel, FlaxUNet2DConditionModel

    vocab_size = tokenizer.write_tiny_clip_tokenizer(os.path.join(folder, "tokenizer"))
    key = jax.random.key(seed)
    for index, (name, cls, config) in enumerate((
            ("unet", FlaxUNet2DConditionModel, TINY_UNET), ("vae", FlaxAutoencoderKL, TINY_VAE),
            ("text_encoder", FlaxCLIPTextModel, dict(TINY_CLIP, vocab_size=vocab_size)))):
        module = cls.from_config(config)
        params = jax.jit(module.init_params)(jax.random.fold_in(key, index))
        module.save_pretrained(os.path.join(folder, name), params)
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as handle:
        json.dump(dict(SD_SCHEDULER, prediction_type=prediction_type), handle, indent=2)
    with open(os.path.join(folder, "model_index.json"), "w") as handle:
        json.dump(dict(export.model_index(), scheduler=["diffusers", "DDPMScheduler"]), handle, indent=2)
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="demo_output")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--images", type=int, default=64)
    options = parser.parse_args(argv)

    from t2i_flax import cli

    cli.setup_devices(8)  # before jax is imported
    from t2i_flax import synthetic

    model_dir = os.path.join(options.workdir, "tiny-sd")
    data_dir = os.path.join(options.workdir, "shapes")
    output_dir = os.path.join(options.workdir, "sd-shapes-model")
    if os.path.isdir(output_dir):  # the demo's own previous output
        shutil.rmtree(output_dir)
    print(f"demo: writing a tiny random SD pipeline to {model_dir}", flush=True)
    write_tiny_pipeline(model_dir)
    print(f"demo: writing {options.images} synthetic captioned images to {data_dir}", flush=True)
    synthetic.write_synthetic_dataset(data_dir, options.images, resolution=32, seed=0)
    argv = ["--pretrained_model_name_or_path", model_dir, "--train_data_dir", data_dir, "--output_dir", output_dir,
            "--resolution", "32", "--center_crop", "--random_flip", "--train_batch_size", "2",
            "--max_train_steps", str(options.steps), "--learning_rate", "1e-3", "--lr_scheduler",
            "constant_with_warmup", "--lr_warmup_steps", "20", "--use_ema", "--ema_decay", "0.99",
            "--report_to", "tensorboard", "--log_every", "10", "--cpu_devices", "8", "--seed", "0",
            "--validation_prompts", "a red circle on a blue background", "a yellow square on a black background",
            "--num_validation_images", "4", "--validation_steps", str(max(1, options.steps // 5)),
            "--validation_num_inference_steps", "20", "--checkpointing_steps", str(options.steps)]
    print("demo: python train_text_to_image_flax.py " + " ".join(argv), flush=True)
    code = cli.main(argv)
    if code:
        return code
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        losses = [json.loads(line)["loss"] for line in handle]
    print(f"demo: loss {losses[0]:.4f} (first {10} steps) -> {losses[-1]:.4f} (last steps)")
    grids = sorted(os.listdir(os.path.join(output_dir, "validation")), key=lambda name: int(name[5:-4]))
    print(f"demo: validation images, early: {os.path.abspath(os.path.join(output_dir, 'validation', grids[0]))}")
    print(f"demo: validation images, end:   {os.path.abspath(os.path.join(output_dir, 'validation', grids[-1]))}")
    print(f"demo: fine-tuned pipeline (diffusers format) with its model card: {os.path.abspath(output_dir)}")
    print(f"demo: TensorBoard logs: tensorboard --logdir {os.path.abspath(os.path.join(output_dir, 'logs'))}")
    print(f"demo: metrics: {os.path.abspath(os.path.join(output_dir, 'metrics.jsonl'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
