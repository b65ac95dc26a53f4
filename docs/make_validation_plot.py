"""Regenerate docs/validation-loss.png: training and validation loss of a train_ldm.py run, read from its
TensorBoard logs (docs/training.md, "Validation loss"). The README's curve is the emoji-64 recipe from scratch:

    accelerate launch train_ldm.py --config configs/ldm/emoji-64.yaml autoencoder=pipelines/default_model/vae \
        output_dir=runs/curve-emoji64 data=data/emoji max_steps=1200 validation_every=100
    python docs/make_validation_plot.py runs/curve-emoji64 [--reference pipelines/default_model]

`--reference` adds the same validation loss (same images, noise and timesteps) of a finished model trained with
that recipe: where the curve is heading.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def scalars(run: Path, tag: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for events in sorted((run / "logs").rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                steps.append(event.step)
                values.append(event.value)
    return steps, values


def reference_loss(run: Path, model: str) -> float:
    """The validation loss of `model` under `run`'s config (its data, autoencoder and validation settings)."""
    import tempfile

    from core.config import load_config
    from recipes.latent_diffusion import LDMTrainConfig, LDMTrainer

    with tempfile.TemporaryDirectory() as tmp:
        last = sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))[-1]
        config = load_config(LDMTrainConfig, last / "config.yaml", [f"init_from={model}", f"output_dir={tmp}",
                                                                     "cache_latents=false", "resume=never"])
        trainer = LDMTrainer(config)
        trainer.setup()
        loss = trainer.validate()
        trainer.cleanup()
    return loss


def main(run: str, reference: str | None = None) -> None:
    run = Path(run)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(*scalars(run, "train/loss"), alpha=0.5, label="training loss (one batch, min-SNR weighted)")
    steps, values = scalars(run, "val/loss")
    ax.plot(steps, values, "o-", label="validation loss (held-out names, fixed noise and timesteps)")
    if reference:
        loss = reference_loss(run, reference)
        ax.axhline(loss, color="grey", linestyle="--", label=f"validation loss of {reference} ({loss:.4f})")
        print(f"{reference}: validation loss {loss:.4f}")
    ax.set(yscale="log", xlabel="step (batch 32)", ylabel="loss",
           title="emoji-64 recipe from scratch on the CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(__file__).parent / "validation-loss.png", dpi=110)
    print("\n".join(f"step {s}: validation loss {v:.4f}" for s, v in zip(steps, values)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--reference" else None)
