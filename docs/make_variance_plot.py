"""Regenerate docs/learned-variance.png from two `ldm eval vlb` results: the bound's per-timestep terms of a
fixed-variance and a learned-variance model (docs/evaluation.md, "Learned variances, measured").

    python docs/make_variance_plot.py runs/eval-lv-fixed/vlb/metrics.json runs/eval-lv-learned/vlb/metrics.json
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(fixed: str, learned: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for label, path in (("fixed variance (posterior)", fixed), ("learned variance (hybrid objective)", learned)):
        metrics = json.loads(Path(path).read_text())
        terms = {int(t): v for t, v in metrics["per_timestep"].items() if int(t) > 0}
        totals = f"total {metrics['bits_per_dim']:.3f} bits/dim, L_0 {metrics['decoder_bits_per_dim']:.2f}"
        ax.plot(list(terms), list(terms.values()), label=f"{label}: {totals}")
    ax.set(xscale="log", yscale="log", xlabel="timestep t", ylabel="KL term L_{t-1}, bits per latent dimension",
           title="the bound by timestep, equal training steps (2,400 of 32)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(__file__).parent / "learned-variance.png", dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
