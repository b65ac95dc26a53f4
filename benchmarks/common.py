"""Helpers for the side-by-side benchmarks: a peak-RSS sampler and a random model of the default's shape."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples RSS every millisecond inside a `with` block; `.peak_above_start` is the extra memory it needed."""

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def peak_above_start(self) -> int:
        return self.peak - self.start


def random_default_shaped_model(folder: Path) -> Path:
    """A model folder with the default recipe's architecture (kl-f4 autoencoder, emoji-64 U-Net, MiniLM) and
    random weights: speed does not depend on the weights, and this needs no training."""
    from diffusers import DDPMScheduler

    from autoencoder.model import build_autoencoder
    from ldm.diffusion import NoiseSchedule
    from ldm.text_encoders import load_text_encoder
    from ldm.unet import build_unet
    from pipelines import Pipeline

    torch.manual_seed(0)
    text_encoder = load_text_encoder("minilm", max_length=32)
    vae = build_autoencoder("kl-f4", resolution=64)
    unet = build_unet("emoji-64", latent_size=16, latent_channels=4, cross_attention_dim=text_encoder.hidden_size)
    scheduler = DDPMScheduler(**NoiseSchedule().to_scheduler_config())
    return Pipeline(vae=vae, text_encoder=text_encoder, unet=unet, scheduler=scheduler).save_pretrained(folder)
