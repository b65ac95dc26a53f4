"""Regenerate docs/validation-loss.png: training and validation loss of a train_ldm.py run, read from its
TensorBoard logs (docs/training.md, "Validation loss"). The README's curve is the emoji-64 recipe from scratch:

    accelerate launch train_ldm.py --config configs/ldm/emoji-64.yaml autoencoder=pipelines/default_model/vae \
        output_dir=runs/curve-emoji64 data=data/emoji max_steps=1200 validation_every=100
    python docs/make_validation_plot.py runs/curve-emoji64
"""

import sys
from pathlib import Path

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


def main(run: str) -> None:
    run = Path(run)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(*scalars(run, "train/loss"), alpha=0.5, label="training loss (one batch, min-SNR weighted)")
    steps, values = scalars(run, "val/loss")
    ax.plot(steps, values, "o-", label="validation loss (held-out names, fixed noise and timesteps)")
    ax.set(yscale="log", xlabel="step (batch 32)", ylabel="loss",
           title="emoji-64 recipe from scratch on the CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(__file__).parent / "validation-loss.png", dpi=110)
    print("\n".join(f"step {s}: validation loss {v:.4f}" for s, v in zip(steps, values)))


if __name__ == "__main__":
    main(sys.argv[1])
