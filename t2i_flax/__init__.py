"""t2i_flax: a JAX/Flax trainer that fine-tunes Stable Diffusion text-to-image models."""

__version__ = "0.2.0"  # also the distribution's version (pyproject.toml reads it from here)
