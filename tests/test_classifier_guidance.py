"""Classifier guidance: the gradient term, a classifier trained through `accelerate launch train_classifier.py`
that pulls samples toward its label, and the checks that refuse a classifier that does not fit the model."""

from __future__ import annotations

import math

import pytest
import torch

from core.errors import UserError
from ldm.diffusion import classifier_guided_epsilon
from pipelines import Pipeline
from pipelines.guidance import ClassifierGuidance

from helpers import LAUNCH, run, scalars


def test_the_guidance_term_is_the_scaled_gradient_of_log_p():
    class Linear(torch.nn.Module):  # log p(y | x) of a 2-class logistic model on the mean of channel 0
        def forward(self, x, t):
            m = x[:, 0].mean(dim=(1, 2))
            return torch.stack([3 * m, -3 * m], dim=1)

    alphas_cumprod = torch.linspace(0.99, 0.01, 1000)
    x = torch.randn(2, 4, 8, 8)
    eps = torch.randn(2, 4, 8, 8)
    guidance = ClassifierGuidance(lambda x, t: eps, Linear(), label=0, scale=2.0, alphas_cumprod=alphas_cumprod,
                                  channels=4)
    out = guidance(x, torch.tensor(400))
    m = x[:, 0].mean(dim=(1, 2))
    p_up = torch.sigmoid(6 * m)  # softmax of (3m, -3m)
    grad = torch.zeros_like(x)
    grad[:, 0] = (6 * (1 - p_up) / 64).view(2, 1, 1)
    torch.testing.assert_close(out, classifier_guided_epsilon(eps, grad, alphas_cumprod[400], 2.0))
    torch.testing.assert_close(out[:, 1:], eps[:, 1:])
    assert (out[:, 0] < eps[:, 0]).all()  # lower eps = a step toward larger channel-0 mean (class 0)


@pytest.fixture(scope="module")
def classifier_dir(emoji_dir, autoencoder_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("classifier") / "run"
    run(LAUNCH + ["train_classifier.py", "--config", "configs/classifier/tiny.yaml", f"data={emoji_dir}",
                  f"autoencoder={autoencoder_dir}", f"output_dir={out}", "max_steps=300", "sample_every=300",
                  "checkpoint_every=300"])
    return out


@pytest.fixture()
def pipe(tiny_components, autoencoder_dir):
    from autoencoder.model import load_autoencoder

    return Pipeline(**{**tiny_components, "vae": load_autoencoder(autoencoder_dir)})


def test_the_classifier_logs_a_validation_loss_that_falls(classifier_dir):
    losses = scalars(classifier_dir, "val/loss")  # held-out names, labelled by style; fixed noise and timesteps
    assert len(losses) == 2 and losses[1] < losses[0]


def test_a_trained_classifier_pulls_samples_toward_its_label(classifier_dir, pipe):
    from ldm.classifier import load_classifier

    classifier = load_classifier(classifier_dir)
    assert (classifier_dir / "samples" / "step-00000300.png").is_file()
    labels = list(classifier.config.labels)
    assert labels == ["openmoji", "twemoji"]

    def probability(scale: float, label: str) -> float:
        latents = pipe.generate([""] * 8, num_inference_steps=8, guidance_scale=1.0, seed=0, scheduler="ddim",
                                classifier=classifier, class_label=label, classifier_scale=scale,
                                output_type="latent", progress=False)
        with torch.no_grad():
            logits = classifier(latents, torch.zeros(len(latents), dtype=torch.long))
        return float(torch.softmax(logits, -1)[:, labels.index(label)].mean())

    for label in labels:
        assert probability(100.0, label) > probability(0.0, label) + 0.05


def test_a_classifier_that_does_not_fit_is_refused(classifier_dir, pipe, tiny_components):
    kwargs = dict(num_inference_steps=2, seed=0, progress=False, classifier=classifier_dir)
    with pytest.raises(UserError, match="unknown class label 'emoji'.*valid: openmoji, twemoji"):
        pipe.generate("", class_label="emoji", **kwargs)
    with pytest.raises(UserError, match="needs class_label"):
        pipe.generate("", **kwargs)
    with pytest.raises(UserError, match="classifier_scale must be a finite number >= 0"):
        pipe.generate("", class_label="twemoji", classifier_scale=math.nan, **kwargs)
    with pytest.raises(UserError, match="another autoencoder"):
        Pipeline(**tiny_components).generate("", class_label="twemoji", **kwargs)
    with pytest.raises(UserError, match="ddpm, ddim, dpm\\+\\+ or unipc"):
        pipe.generate("", class_label="twemoji", scheduler="euler", **kwargs)
    with pytest.raises(UserError, match="not a classifier folder"):
        pipe.generate("", class_label="twemoji", **{**kwargs, "classifier": classifier_dir / "logs"})


def test_ldm_generate_with_a_classifier(classifier_dir, pipe, tmp_path, capsys):
    from cli.main import main as ldm_main

    model = pipe.save_pretrained(tmp_path / "model")
    out = tmp_path / "guided.png"
    ldm_main(["generate", "", "--model", str(model), "-o", str(out), "--num-inference-steps", "3", "--scheduler",
              "ddim", "--classifier", str(classifier_dir), "--class-label", "twemoji", "--classifier-scale", "5"])
    assert f"wrote {out}" in capsys.readouterr().out


def test_eval_classifier_guidance_rows_files_and_seeds(classifier_dir, pipe, emoji_dir, tmp_path):
    from evaluation.classifier_guidance import evaluate_classifier_guidance, format_table, guided_samples
    from ldm.classifier import load_classifier

    classifier = load_classifier(classifier_dir)
    # scale 0 is plain sampling with the same seeds: only the scale changes between rows
    latents, images = guided_samples(pipe, classifier, ["twemoji"] * 3, 0.0, "ddim", 3, 1.0, seed=7, batch_size=4)
    plain = pipe.generate([""] * 3, num_inference_steps=3, guidance_scale=1.0, scheduler="ddim", seed=7,
                          output_type="latent", progress=False)
    torch.testing.assert_close(latents, plain)
    assert images.shape == (3, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    metrics = evaluate_classifier_guidance(pipe, classifier, str(emoji_dir), tmp_path / "out", scales=(0.0, 100.0),
                                           num_images=12, num_inference_steps=4, batch_size=8)
    assert [r["classifier_scale"] for r in metrics["rows"]] == [0.0, 100.0]
    assert metrics["label_column"] == "style"
    for row in metrics["rows"]:
        assert 0 <= row["nearest_real_accuracy"] <= 1 and 0 < row["chance"] < 1
    # pinned on the seeded tiny classifier and model (2026-12-02)
    assert metrics["fid_real_vs_real"] == pytest.approx(107.14, rel=0.01)
    assert [r[k] for r in metrics["rows"] for k in ("fid", "nearest_real_accuracy", "classifier_accuracy")] == \
        pytest.approx([459.45, 0.5, 0.5833, 438.10, 0.5, 1.0], rel=0.01)
    # the guiding classifier's own accuracy rises with its scale (it is what the gradient pushes)
    assert metrics["rows"][1]["classifier_accuracy"] >= metrics["rows"][0]["classifier_accuracy"]
    for name in ("metrics.json", "classifier_guidance.png", "samples.png"):
        assert (tmp_path / "out" / name).is_file()
    assert "| 100 |" in format_table(metrics)
    with pytest.raises(UserError, match="scales must be numbers >= 0"):
        evaluate_classifier_guidance(pipe, classifier, str(emoji_dir), tmp_path / "bad", scales=(-1.0,))


def test_a_validation_split_larger_than_train_keeps_its_own_labels(emoji_dir, autoencoder_dir, tmp_path):
    """Held-out rows carry their label; it is not looked up by their index among the (fewer) training labels."""
    import json
    import shutil

    from core.config import load_config
    from recipes.classifier import ClassifierTrainConfig, ClassifierTrainer

    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    rows = [json.loads(line) for line in (emoji_dir / "train" / "metadata.jsonl").read_text().splitlines()][:2]
    for row in rows:  # two training images (both styles), eight held-out ones
        shutil.copy(emoji_dir / "train" / row["file_name"], data / "train" / row["file_name"])
    (data / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copytree(emoji_dir / "validation", data / "validation")
    held = [json.loads(line) for line in (data / "validation" / "metadata.jsonl").read_text().splitlines()]
    config = load_config(ClassifierTrainConfig, "configs/classifier/tiny.yaml",
                         [f"data={data}", f"autoencoder={autoencoder_dir}", f"output_dir={tmp_path / 'run'}"])
    trainer = ClassifierTrainer(config)
    trainer.setup()
    assert [trainer.labels[int(label)] for _, label in trainer.validation_rows] == [r["style"] for r in held]
