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
