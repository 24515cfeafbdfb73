"""Does a training configuration fit a TPU? The real train step compiled ahead of time for a TPU topology on a
CPU host (no TPU needed, only libtpu, the compiler): per-core memory and whether it fits.

    python -m t2i_flax.aot --topology v3-8 <the trainer's flags>
    t2i-flax-aot --topology v3-8 --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --resolution 512 --train_batch_size 2 --mixed_precision bf16 --fsdp 8 --use_ema

Needs `pip install libtpu==0.0.42.1` (what `jax[tpu]==0.10.2` pins) next to the CPU jax.

The trainer's flags are read by the trainer's own parser (t2i_flax.cli.parse_config) and the step is the
trainer's own setup (t2i_flax/setup.py, which train.run builds too): --fsdp, --mixed_precision, --use_ema,
--lora_rank, --cache_latents, --train_batch_size (per device), --resolution, --attention and the optimizer flags
mean what they mean there.
Nothing is loaded but the model's config files and tokenizer: parameters, optimizer state, EMA, frozen models
and the batch are ShapeDtypeStructs with the trainer's shardings (a Hub repo id downloads its configs only).
No data is read: --dataset_name / --train_data_dir may be left out (or given, and are then ignored).
--validation_prompts also compiles the validation sampler (t2i_flax/validation.py's program) and reports its
memory with the training state resident beside it, as it is while training.

Output: a report on stdout (progress on stderr), or with --json one JSON object. Per core: arguments, outputs,
aliased (the donated state, counted once), temporaries, total = arguments + outputs - aliased + temporaries,
against the usable HBM per core the compiler reports for the topology (found by compiling an over-large
program; the documented table USABLE_HBM_GIB if that fails). "from shapes" is the per-core bytes of the
sharded ShapeDtypeStructs themselves (the compiler's arguments add TPU tile padding).

The same flags again answer without compiling: what was measured of each program is kept in aot_reports/ of the
trainer's --compilation_cache_dir (cache.py; `none`: compile every time).

The package: topology.py (the TPU topology and its usable HBM), measure.py (the compiled programs' memory),
cache.py (what was measured, kept per program), report.py (the text report), cli.py (flags, run, main).

Exit codes: 0 it fits; 3 (EXIT_DOES_NOT_FIT) the train step or the validation sampler does not fit (the
report shows the compiler's RESOURCE_EXHAUSTED line); 2 a bad flag, model folder or a missing libtpu (one line
on stderr, as the trainer); 1 a bug (traceback)."""
from t2i_flax.aot.cli import EXIT_DOES_NOT_FIT, EXIT_FITS, main
from t2i_flax.aot.topology import NeedsLibtpu, resolve_topology, topology_devices

__all__ = ["EXIT_DOES_NOT_FIT", "EXIT_FITS", "NeedsLibtpu", "main", "resolve_topology", "topology_devices"]
