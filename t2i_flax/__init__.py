"""t2i_flax: a JAX/Flax trainer that fine-tunes Stable Diffusion text-to-image models."""

__version__ = "0.1.0"
