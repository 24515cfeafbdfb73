"""The PyTorch SDXL train step to time beside ours (bench/train_step.py --config sdxl), on the same card: the math
of diffusers' train_text_to_image_sdxl.py per step (VAE posterior sample x scaling_factor, both text encoders'
penultimate hidden states side by side, the second's pooled projection, time ids, UNet under autocast, float32 MSE,
backward, clip, AdamW), with the encoders run in the step as ours does (the reference script precomputes them:
`--precomputed` times that loop, UNet only). Random weights of the real shapes (bench/configs.py); one JSON line.

    python bench/torch_sdxl_step.py --config sdxl --res 1024 --batch 1 --dtype bf16      # GPU
    python bench/torch_sdxl_step.py --config tiny-sdxl --res 32 --batch 2 --steps 2      # CPU smoke
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # configs.py


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="sdxl", choices=("sdxl", "tiny-sdxl"))
    parser.add_argument("--res", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "no"))
    parser.add_argument("--precomputed", action="store_true", help="latents and embeddings given: the UNet step only")
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from configs import SDXL_CONFIGS, TINY_SDXL

    unet_config, vae_config, clip_config, clip_2_config = {**SDXL_CONFIGS, "tiny-sdxl": TINY_SDXL}[args.config]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    frozen_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    start = time.time()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config).to(device).train()
    vae = AutoencoderKL(**vae_config).to(device, dtype=frozen_dtype).requires_grad_(False)
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip_config)).to(device, dtype=frozen_dtype).requires_grad_(False)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_2_config)).to(
        device, dtype=frozen_dtype).requires_grad_(False)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-6, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(args.batch, 3, args.res, args.res, generator=generator).mul(2).sub(1).to(device)
    ids = torch.randint(0, clip_config["vocab_size"], (args.batch, 77), generator=generator).to(device)
    time_ids = torch.tensor([[args.res, args.res, 0, 0, args.res, args.res]] * args.batch, device=device)
    init_s = time.time() - start

    def encode():
        with torch.no_grad():
            latents = vae.encode(pixels.to(frozen_dtype)).latent_dist.sample() * vae.config.scaling_factor
            first = text_encoder(ids, output_hidden_states=True, return_dict=False)
            second = text_encoder_2(ids, output_hidden_states=True, return_dict=False)
            context = torch.concat([first[-1][-2], second[-1][-2]], dim=-1)
        return latents.float(), context, second[0]

    precomputed = encode()

    def step():
        latents, context, pooled = precomputed if args.precomputed else encode()
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(device, dtype=frozen_dtype, enabled=args.dtype == "bf16"):
            prediction = unet(noisy, timesteps, context, added_cond_kwargs={"text_embeds": pooled,
                                                                             "time_ids": time_ids}).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    start = time.time()
    for _ in range(args.steps):
        loss = step()
    sync()
    step_s = (time.time() - start) / args.steps
    print(json.dumps({"bench": "torch-sdxl-step" + ("-precomputed" if args.precomputed else ""),
                      "config": args.config, "res": args.res, "batch_per_device": args.batch, "platform": device,
                      "dtype": args.dtype, "torch": torch.__version__, "init_s": round(init_s, 1),
                      "step_s": round(step_s, 4), "img_per_s": round(args.batch / step_s, 2), "loss": float(loss),
                      "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else 0.0}))


if __name__ == "__main__":
    main()
