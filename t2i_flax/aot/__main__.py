"""python -m t2i_flax.aot (see t2i_flax/aot/__init__.py)."""
from t2i_flax.aot.cli import main

raise SystemExit(main())
