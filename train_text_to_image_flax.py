#!/usr/bin/env python3
"""Fine-tune Stable Diffusion 1.x/2.x with JAX/Flax: the flags of diffusers' train_text_to_image_flax.py.

    python train_text_to_image_flax.py --help
"""
import sys

from t2i_flax.cli import main

if __name__ == "__main__":
    sys.exit(main())
