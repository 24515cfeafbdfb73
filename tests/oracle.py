"""Helpers shared by the parity tests against the PyTorch oracle."""
import numpy as np
import torch


def rel_err(ours, reference) -> float:
    """max |ours - reference| / max |reference|, after checking the shapes agree."""
    ours, reference = np.asarray(ours, np.float32), np.asarray(reference, np.float32)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Perturb norm scales/shifts and biases so that no parameter keeps its trivial 1/0 init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
            elif name.endswith("bias"):
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def write_torch_pipeline(folder: str, prediction_type: str = "epsilon", seed: int = 0) -> str:
    """A tiny SD 1.x-shaped pipeline made with the PyTorch classes (diffusers/transformers `save_pretrained`),
    every norm scale/shift and bias perturbed. GroupNorms of 4 or 8 channels per group, so that biases
    feeding a norm have real (non-zero) gradients, unlike a one-channel-per-group model."""
    import json
    import os

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from t2i_flax import export, tokenizer

    vocab_size = tokenizer.write_tiny_clip_tokenizer(os.path.join(folder, "tokenizer"))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1))
    for index, (name, model) in enumerate((("unet", unet), ("vae", vae), ("text_encoder", text_encoder))):
        randomize_(model, seed=seed + 10 + index)
        model.save_pretrained(os.path.join(folder, name))
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  prediction_type=prediction_type).save_pretrained(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json"), "w") as handle:
        json.dump(dict(export.model_index(), scheduler=["diffusers", "DDPMScheduler"]), handle, indent=2)
    return folder


def write_torch_sdxl_pipeline(folder: str, prediction_type: str = "epsilon", seed: int = 0) -> str:
    """A tiny SDXL-shaped pipeline made with the PyTorch classes: the UNet of t2i_flax.demo.TINY_SDXL_UNET
    (text_time conditioning, per-block depths), two CLIP text encoders (32 and 16 features; the second with a
    16-feature projection, as CLIPTextModelWithProjection), the second tokenizer padding with "!" as SDXL's,
    an Euler scheduler config as SDXL base's; every norm scale/shift and bias perturbed."""
    import json
    import os

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from t2i_flax import family, tokenizer
    from t2i_flax.demo import TINY_SDXL_POOLED_DIM, TINY_SDXL_UNET

    vocab_size = tokenizer.write_tiny_clip_tokenizer(os.path.join(folder, "tokenizer"))
    tokenizer.write_tiny_clip_tokenizer(os.path.join(folder, "tokenizer_2"), pad_token="!")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{key: tuple(value) if isinstance(value, list) else value
                                   for key, value in TINY_SDXL_UNET.items()})
    vae = AutoencoderKL(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=32, scaling_factor=0.13025, force_upcast=True)
    text = dict(intermediate_size=37, num_hidden_layers=3, max_position_embeddings=77, vocab_size=vocab_size,
                bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, num_attention_heads=4, pad_token_id=vocab_size - 1,
                                                **text))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=16, num_attention_heads=2, projection_dim=TINY_SDXL_POOLED_DIM, pad_token_id=0, hidden_act="gelu",
        **text))
    components = (("unet", unet), ("vae", vae), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2))
    for index, (name, model) in enumerate(components):
        randomize_(model, seed=seed + 10 + index)
        model.save_pretrained(os.path.join(folder, name))
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                           timestep_spacing="leading", prediction_type=prediction_type).save_pretrained(
        os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json"), "w") as handle:
        json.dump(family.STABLE_DIFFUSION_XL.model_index(), handle, indent=2)
    return folder


def write_torch_sd2_pipeline(folder: str, seed: int = 0) -> str:
    """A tiny SD 2.x-shaped pipeline made with the PyTorch classes: linear projections in the transformers, a
    head count per block and SD's block pattern with 2 layers per block (as SD 2.x's UNet), a text encoder with the exact GELU (OpenCLIP's, where SD 1.x's OpenAI
    CLIP has quick_gelu), a v-prediction DDIM scheduler as stable-diffusion-2-1's; every norm scale/shift and bias
    perturbed."""
    import json
    import os

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from t2i_flax import export, tokenizer

    vocab_size = tokenizer.write_tiny_clip_tokenizer(os.path.join(folder, "tokenizer"))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(  # SD 1.5/2.x's block pattern and 2 layers per block, at a tiny width
        sample_size=16, block_out_channels=(32, 32, 64), layers_per_block=2, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
        attention_head_dim=(2, 2, 4), use_linear_projection=True)
    vae = AutoencoderKL(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3, max_position_embeddings=77,
        hidden_act="gelu", vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1))
    for index, (name, model) in enumerate((("unet", unet), ("vae", vae), ("text_encoder", text_encoder))):
        randomize_(model, seed=seed + 20 + index)
        model.save_pretrained(os.path.join(folder, name))
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction").save_pretrained(
        os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json"), "w") as handle:
        json.dump(dict(export.model_index(), scheduler=["diffusers", "DDIMScheduler"]), handle, indent=2)
    return folder
