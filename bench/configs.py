"""Model configs for the benchmarks: a copy of ../shared/bench/configs.py (the anchor's), so that bench/ is
self-contained on the GPU machine, where ../shared does not travel. Keep the two in sync."""

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)
SD15_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8,
)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
TINY_CLIP = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu")

CONFIGS = {"sd15": (SD15_UNET, SD15_VAE, SD15_CLIP), "tiny": (TINY_UNET, TINY_VAE, TINY_CLIP)}

# SD 2.x (stabilityai/stable-diffusion-2-base, -2-1): the UNet's heads are given per block as attention_head_dim
# (5, 10, 20, 20) heads of 64 channels, cross-attention over the 1024-wide OpenCLIP-H text encoder (23 layers,
# GELU), linear projections in the transformers. 2-base is 512 px (64x64 latents, epsilon); 2-1 is 768 px
# (96x96 latents, v_prediction) and upcasts attention to float32. The VAE is SD 1.5's. Not in
# ../shared/bench/configs.py (the anchor has no SD 2 run).
SD2_UNET = dict(SD15_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SD21_UNET = dict(SD2_UNET, sample_size=96, upcast_attention=True)
SD2_CLIP = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)

CONFIGS.update({"sd2-base": (SD2_UNET, SD15_VAE, SD2_CLIP), "sd21": (SD21_UNET, SD15_VAE, SD2_CLIP)})
# Each config's native resolution and its scheduler's prediction type.
NATIVE = {"sd15": (512, "epsilon"), "sd2-base": (512, "epsilon"), "sd21": (768, "v_prediction"), "tiny": (32, "epsilon")}

# SDXL base (stabilityai/stable-diffusion-xl-base-1.0, 1024 px = 128x128 latents, epsilon): a 3-block UNet without
# attention in its first block, transformer depths (1, 2, 10), heads (5, 10, 20) of 64 channels, cross-attention
# over both text encoders' 768 + 1280 features, text_time conditioning (6 time ids x 256 + the pooled 1280); the
# SD VAE's shapes (scaling_factor 0.13025); CLIP ViT-L and OpenCLIP bigG (32 layers, 1280 wide, a 1280
# projection). Not in ../shared/bench/configs.py.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025)
SDXL_CLIP = dict(SD15_CLIP, projection_dim=768)
SDXL_CLIP_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
SDXL_CONFIGS = {"sdxl": (SDXL_UNET, SDXL_VAE, SDXL_CLIP, SDXL_CLIP_2)}
NATIVE["sdxl"] = (1024, "epsilon")
# A tiny SDXL shape for CPU smoke runs of the SDXL benchmarks (cross-attention 32 + 16, pooled 16).
TINY_SDXL = (
    dict(TINY_UNET, block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
         "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
         transformer_layers_per_block=(1, 1, 2), attention_head_dim=(1, 2, 4), cross_attention_dim=48,
         use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
         projection_class_embeddings_input_dim=6 * 8 + 16),
    TINY_VAE, TINY_CLIP, dict(TINY_CLIP, hidden_size=16, num_attention_heads=2, projection_dim=16))
