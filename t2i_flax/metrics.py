"""Where training metrics go: a tqdm bar, metrics.jsonl in the output dir, TensorBoard (tensorboardX,
no TensorFlow) and wandb when asked. Only process 0 writes.

--tracker_project_name names wandb's project and, as accelerate's TensorBoard tracker does in the PyTorch scripts,
TensorBoard's run folder inside the logging dir; without it, wandb's project is DEFAULT_PROJECT and TensorBoard
writes in the logging dir itself.

metrics.jsonl: a line per logged window of steps ({"step", "loss", "grad_norm", "learning_rate", "images_per_second"},
the window's means) and, with --validation_split, a line per validation ({"step", "val_loss"})."""
from __future__ import annotations

import json
import os
import sys
import time

from tqdm.auto import tqdm

DEFAULT_PROJECT = "t2i_flax"


def log(message: str) -> None:
    """A line of the run's output (process 0 only), above the progress bar when there is one."""
    import jax

    if jax.process_index() == 0:
        tqdm.write(message)
        sys.stdout.flush()


class MetricsWriter:
    def __init__(self, output_dir: str, logging_dir: str, report_to: str, total_steps: int, initial_step: int = 0,
                 run_config: dict | None = None, enabled: bool = True, images_per_step: int = 1,
                 append: bool = False, project_name: str | None = None):
        self.enabled = enabled
        self.images_per_step = images_per_step
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not enabled)
        self.jsonl = self.tensorboard = self.wandb = None
        self._window = {}  # metric -> list of values since the last log line
        self._window_start = time.perf_counter()
        self._window_steps = 0
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        # A resumed run continues the file; a new one starts it afresh.
        self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a" if append else "w")
        if report_to in ("tensorboard", "all"):
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(os.path.join(output_dir, logging_dir, *filter(None, [project_name])))
        if report_to in ("wandb", "all"):
            import wandb  # the command line checked that it is installed
            self.wandb = wandb.init(project=project_name or DEFAULT_PROJECT, config=run_config or {})

    def advance(self) -> None:
        """One more step dispatched (the bar moves; its values come later, with `add`)."""
        self.bar.update(1)

    def add(self, step: int, metrics: dict) -> None:
        """Values of one finished step (host floats)."""
        for name, value in metrics.items():
            self._window.setdefault(name, []).append(float(value))
        self._window_steps += 1

    def flush(self, step: int) -> dict | None:
        """Averages the window, writes it everywhere, returns it."""
        if not self._window_steps:
            return None
        elapsed = time.perf_counter() - self._window_start
        averaged = {name: sum(values) / len(values) for name, values in self._window.items()}
        averaged["images_per_second"] = self._window_steps * self.images_per_step / max(elapsed, 1e-9)
        self._window, self._window_steps, self._window_start = {}, 0, time.perf_counter()
        if self.enabled:
            self.bar.set_postfix(loss=f"{averaged['loss']:.4f}", lr=f"{averaged['learning_rate']:.2e}",
                                 img_s=f"{averaged['images_per_second']:.1f}")
            self.jsonl.write(json.dumps({"step": step, **averaged}) + "\n")
            self.jsonl.flush()
            if self.tensorboard is not None:
                for name, value in averaged.items():
                    self.tensorboard.add_scalar(f"train/{name}", value, step)
            if self.wandb is not None:
                self.wandb.log({f"train/{k}": v for k, v in averaged.items()}, step=step)
        return averaged

    def add_validation(self, step: int, values: dict) -> None:
        """Values measured at a validation (the held-out loss `val_loss`): a line of their own in metrics.jsonl
        ({"step", "val_loss"}), scalars of their own names in TensorBoard and wandb."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(dict(values), step=step)

    def add_image(self, step: int, name: str, image_HWC, caption: str) -> None:
        """A uint8 (H, W, 3) image (a validation grid) to TensorBoard and wandb."""
        if self.tensorboard is not None:
            self.tensorboard.add_image(name, image_HWC, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(image_HWC, caption=caption)}, step=step)

    def close(self) -> None:
        self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def logged_values(output_dir: str, name: str) -> dict[int, float]:
    """{step: value} of one metric in <output_dir>/metrics.jsonl (the last line of a step wins: a resumed run logs
    again the steps after its checkpoint)."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as handle:
        entries = [json.loads(line) for line in handle if line.strip()]
    return dict(sorted({entry["step"]: entry[name] for entry in entries if name in entry}.items()))
