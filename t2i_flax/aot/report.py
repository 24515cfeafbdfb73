"""The aot result as a text report."""
from __future__ import annotations


# What the report calls the optimizer state of each --optimizer.
OPTIMIZER_NAMES = {"adamw": "Adam", "adafactor": "Adafactor", "lion": "Lion", "prodigy": "Prodigy"}


def _size(value) -> str:
    """Bytes as GiB (2 decimals), or MiB below 1 GiB (tiny models)."""
    if value is None:
        return "-"
    return f"{value / 2**30:.2f} GiB" if abs(value) >= 2**30 else f"{value / 2**20:.1f} MiB"


def report_text(result: dict) -> str:
    usable = result["usable_hbm_bytes"]
    lines = [f"topology: {result['topology']} ({result['libtpu_topology']}): {result['devices']} x "
             f"{result['device_kind']} of {result['hbm_gib']:g} GiB, {result['hosts']} host(s); usable HBM per device "
             f"{_size(usable)} "
             f"({'reported by the compiler' if result['usable_hbm_source'] == 'compiler' else 'documented table'})",
             f"model: {result['model']} ({result['prediction_type']}), compute {result['compute_dtype']}, "
             f"{'LoRA rank ' + str(result['lora_rank']) if result['lora_rank'] else 'full fine-tuning'}, "
             f"EMA {'yes' if result['use_ema'] else 'no'}",
             f"layout: mesh data={result['mesh']['data']} fsdp={result['mesh']['fsdp']}; batch "
             f"{result['batch_per_device']} per device ({result['global_batch']} global) at {result['resolution']} px"]
    step = result["train_step"]
    if result.get("buckets"):
        lines.append(f"aspect-ratio buckets: {len(result['buckets'])} compiled; per device:")
        lines += [f"  {b['width']}x{b['height']}: " + (_size(b["total_bytes"]) if b["fits"] else "DOES NOT FIT")
                  for b in result["buckets"]]
        lines.append(f"the bucket that needs the most, {step['bucket'][0]}x{step['bucket'][1]}:")
    lines.append(f"train step ({step['trained_params']:,} trained parameters), {_compiled(step)}:")
    for title, sizes in (("arguments in the compiled layouts", step["padded"]),
                         ("arguments from shapes", step["shapes"])):
        if sizes:
            lines.append(f"  {title}: {_size(sizes['argument_bytes'])} = params {_size(sizes['params_bytes'])} + "
                         f"{OPTIMIZER_NAMES.get(step.get('optimizer', 'adamw'), 'optimizer')} "
                         f"{_size(sizes['opt_state_bytes'])} + EMA {_size(sizes['ema_bytes'])} + frozen models "
                         f"{_size(sizes['frozen_bytes'])} + batch {_size(sizes['batch_bytes'])}")
    lines += _memory_lines(step, usable)
    validation = result.get("validation")
    if validation is not None:
        lines.append(f"validation sampler ({validation['images']} images as a batch of {validation['batch']}, "
                     f"{validation['scheduler']} {validation['steps']} steps, guidance "
                     f"{'on' if validation['guidance'] else 'off'}), {_compiled(validation)}:")
        lines += _memory_lines(validation, usable)
        if validation["memory"] is not None:
            total = validation["with_training_bytes"]
            verdict = (f"fits ({_size(usable - total)} headroom)" if total <= usable else "DOES NOT FIT")
            lines.append(f"  + the rest of the training state, resident meanwhile "
                         f"({_size(validation['resident_bytes'])}): {_size(total)} of {_size(usable)} -> {verdict}")
    lines.append(f"result: {'fits' if result['fits'] else 'DOES NOT FIT'} on a {result['topology']}")
    return "\n".join(lines)


def _compiled(part: dict) -> str:
    if part.get("from_cache"):
        return f"measured when it compiled in {part['compile_s']} s (kept in the compilation cache folder)"
    return f"compiled in {part['compile_s']} s"


def _memory_lines(part: dict, usable: int) -> list[str]:
    memory = part["memory"]
    if memory is None:
        return ["  DOES NOT FIT: " + part["error"][0]] + ["    " + line for line in part["error"][1:]]
    headroom = usable - memory["total_bytes"]
    # The sum is an upper bound: the compiler may place temporaries in buffers that are dead by then (the donated
    # state's), so a program it compiled can add up to more than the usable HBM. It fits, with no margin to speak of.
    verdict = (f"fits ({_size(headroom)} headroom)" if headroom >= 0 else
               f"fits only because the compiler reuses dead buffers: the sum is {_size(-headroom)} over the usable "
               f"HBM (no margin)")
    return [f"  per device: arguments {_size(memory['argument_bytes'])} + outputs {_size(memory['output_bytes'])} "
            f"- aliased {_size(memory['alias_bytes'])} + temporaries {_size(memory['temp_bytes'])} "
            f"= {_size(memory['total_bytes'])} of {_size(usable)} -> {verdict}"]
