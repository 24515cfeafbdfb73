"""Time and peak host RAM to load SD 1.5-sized weights (random tensors of the real shapes) from safetensors.

    python bench/load_weights.py [--workdir /tmp/sd15-random] [--component unet|vae|text_encoder|all]

Writes the folder once (float32 safetensors with PyTorch names, made from our own classes' shapes), then
loads each component in a fresh subprocess and prints one JSON line per component."""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SD15 = {
    "unet": ("FlaxUNet2DConditionModel", dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, cross_attention_dim=768, attention_head_dim=8)),
    "vae": ("FlaxAutoencoderKL", dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, sample_size=512)),
    "text_encoder": ("FlaxCLIPTextModel", dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu")),
}


def write_folder(workdir):
    import numpy as np

    from t2i_flax import models, weights

    rng = np.random.default_rng(0)
    for component, (class_name, config) in SD15.items():
        folder = os.path.join(workdir, component)
        module = getattr(models, class_name).from_config(config)
        if os.path.isfile(os.path.join(folder, module.weights_name)):
            continue
        flat = weights.flatten(module.abstract_params())
        params = weights.unflatten({p: (rng.standard_normal(s.shape, dtype=np.float32) * 0.02) for p, s in flat.items()})
        module.save_pretrained(folder, params)


def peak_rss_bytes():
    """This process's high-water RSS (VmHWM resets at exec, unlike ru_maxrss which a child inherits)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def load_one(workdir, component):
    from t2i_flax import models, weights

    class_name = SD15[component][0]
    start = time.perf_counter()
    _, params = getattr(models, class_name).from_pretrained(workdir, subfolder=component)
    seconds = time.perf_counter() - start
    count = sum(v.size for v in weights.flatten(params).values())
    peak_gib = peak_rss_bytes() / 2**30
    print(json.dumps({"bench": "load_safetensors", "component": component, "params_millions": round(count / 1e6, 1),
                      "file_gib": round(sum(os.path.getsize(os.path.join(workdir, component, f)) for f in
                                            os.listdir(os.path.join(workdir, component))) / 2**30, 2),
                      "load_s": round(seconds, 2), "peak_rss_gib": round(peak_gib, 2)}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/sd15-random")
    parser.add_argument("--component", default="all")
    parser.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.load_only:
        load_one(a.workdir, a.component)
        sys.exit(0)
    write_folder(a.workdir)
    for component in (SD15 if a.component == "all" else [a.component]):
        subprocess.run([sys.executable, __file__, "--workdir", a.workdir, "--component", component, "--load-only"],
                       check=True)
