"""`ldm eval vlb`: the variational bound of a text-to-image model on held-out latents, term by term.

The bound is on the density of the autoencoder's latents (posterior means times the scaling factor), conditioned on
each image's caption, not on pixels: it says how well the U-Net models the latent space it was trained in. Reported
per latent dimension in bits; the per-timestep curve shows which noise levels carry it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from core.data.dataset import ImageCaptionDataset, SkippingCollate, load_image_caption_dataset
from core.errors import UserError
from ldm.diffusion import NoiseSchedule, variational_bound

def model_schedule(pipe, training_config=None) -> NoiseSchedule:
    """The noise schedule of the model's scheduler config, checked against its training config (the typed config
    saved beside it) when there is one."""
    if pipe.is_flow:
        raise UserError("the variational bound is a diffusion model's (DDPM eq. 5); this is a flow-matching model "
                        "(prediction_type=flow)")
    # a U-Net with variance outputs uses them, whichever sampler its folder saved
    schedule = dataclasses.replace(NoiseSchedule.from_scheduler_config(pipe.scheduler.config),
                                   learned_variance=pipe.predicts_variance)
    for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                "zero_terminal_snr"):
        trained = getattr(training_config, key, None)  # None: not recorded (a config read without validation)
        if trained is not None and trained != getattr(schedule, key):
            raise UserError(f"the model's scheduler config says {key}={getattr(schedule, key)!r} but its training "
                            f"config.yaml says {trained!r}: the bound would use the wrong schedule")
    return schedule


@torch.no_grad()
def evaluate_vlb(pipe, data: str, out: str | Path, split: str = "validation", num_images: int = 100,
                 timestep_stride: int = 1, batch_size: int = 50, training_config=None,
                 seed: int = 0) -> dict:
    """Bits per latent dimension of the bound and of each term (prior, KL terms, decoder); writes metrics.json and
    vlb.png. With `timestep_stride` S > 1 only every S-th KL term is computed and their sum is scaled by S (an
    estimate; the prior and decoder terms are always exact)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    schedule = model_schedule(pipe, training_config)
    if timestep_stride < 1:
        raise UserError(f"--timestep-stride must be at least 1, got {timestep_stride}")
    ds = load_image_caption_dataset(data, split)
    count = min(num_images, len(ds))
    loader = torch.utils.data.DataLoader(ImageCaptionDataset(ds.select(range(count)), pipe.default_size()),
                                         batch_size=batch_size, collate_fn=SkippingCollate())
    timesteps = torch.cat([torch.zeros(1, dtype=torch.long),
                           torch.arange(timestep_stride, schedule.num_train_timesteps, timestep_stride)])
    torch.manual_seed(seed)
    priors, terms, dims = [], [], 0
    # one U-Net pass per batch and timestep: 1,000 per batch at stride 1, so the bar counts passes, not batches
    progress = tqdm(total=len(loader) * len(timesteps), desc="variational bound", unit="pass")
    for batch in loader:
        if batch is None:
            progress.update(len(timesteps))
            continue
        pixels = batch["pixel_values"].to(pipe.device, pipe.vae.dtype)
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        context = pipe.text_embeddings([variants[0] for variants in batch["captions"]]).to(pipe.unet.dtype)

        def predict(xt: torch.Tensor, t: torch.Tensor):
            progress.update(1)
            output = pipe.denoiser(xt.to(pipe.unet.dtype), t.to(pipe.device), context).cpu().double()
            if not pipe.predicts_variance:
                return output
            prediction, variance = output.split(xt.shape[1], dim=1)
            return prediction, schedule.learned_variance_from(variance, t)

        prior, batch_terms = variational_bound(schedule, latents.cpu(), predict, timesteps)
        priors.append(prior)
        terms.append(batch_terms)
        dims = latents[0].numel()
    progress.close()
    prior, terms = torch.cat(priors), torch.cat(terms)
    bits = 1 / (dims * math.log(2))
    kl = terms[:, 1:].sum(1) * timestep_stride
    total = prior + terms[:, 0] + kl
    per_timestep = (terms.mean(0) * bits).tolist()
    metrics = {"data": str(data), "split": split, "num_images": len(total), "latent_dims": dims,
               "timestep_stride": timestep_stride, "bits_per_dim": float(total.mean() * bits),
               "bits_per_dim_stderr": float(total.std() * bits / math.sqrt(len(total))),
               "prior_bits_per_dim": float(prior.mean() * bits),
               "decoder_bits_per_dim": float(terms[:, 0].mean() * bits),
               "kl_bits_per_dim": float(kl.mean() * bits),
               "per_timestep": dict(zip(timesteps.tolist(), per_timestep))}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_terms(timesteps.tolist(), per_timestep, out / "vlb.png")
    return metrics


def plot_terms(timesteps: list[int], bits: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(timesteps[1:], bits[1:], label="KL term L_{t-1}")
    axis.set(xlabel="timestep t", ylabel="bits per latent dimension", yscale="log",
             title=f"variational bound by timestep (decoder term at t=0: {bits[0]:.3g})")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def format_table(metrics: dict) -> str:
    return "\n".join([
        f"N = {metrics['num_images']} ({metrics['split']}), {metrics['latent_dims']} latent dimensions, every "
        f"{metrics['timestep_stride']} timestep(s); bits per latent dimension (a bound on the latents' density)",
        "| term | bits / dim |", "|---|---|",
        f"| prior L_T | {metrics['prior_bits_per_dim']:.4f} |",
        f"| KL terms, sum | {metrics['kl_bits_per_dim']:.4f} |",
        f"| decoder L_0 | {metrics['decoder_bits_per_dim']:.4f} |",
        f"| total | {metrics['bits_per_dim']:.4f} +- {metrics['bits_per_dim_stderr']:.4f} |"])
