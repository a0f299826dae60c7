"""Shared by the MAISI parity tests: perturbed MONAI weights, layout changes, error measure."""

import numpy as np
import torch


def perturb(m, seed=0):
    """Every parameter moved by a random amount (zero-initialised convs would hide layers)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_((0.1 if p.ndim == 1 else p[0].numel() ** -0.5) * torch.randn_like(p))
    return m.eval()


def to_torch(a):
    """(B, X, Y, Z, C) numpy -> (B, C, X, Y, Z) torch."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 4, 1, 2, 3)))


def to_ours(t):
    """(B, C, X, Y, Z) torch -> (B, X, Y, Z, C) numpy."""
    return t.detach().numpy().transpose(0, 2, 3, 4, 1)


def rel_err(ref, ours) -> float:
    """max |ref - ours| / max |ref| (ref must not be all zero)."""
    ref, ours = np.asarray(ref, np.float64), np.asarray(ours, np.float64)
    assert ref.shape == ours.shape, (ref.shape, ours.shape)
    scale = np.abs(ref).max()
    assert scale > 0
    return float(np.abs(ref - ours).max() / scale)
