"""Post-hoc EMA (EDM2): power-function EMAs snapshotted in training through `accelerate launch`, any length in
between synthesised afterwards by `ldm ema`, several scored by the validation loss."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.config import load_config
from core.errors import UserError
from core.post_hoc_ema import snapshot_steps, synthesize
from recipes.latent_diffusion import LDMTrainConfig
from helpers import BIN, LAUNCH, run

LDM = [str(BIN / "ldm")]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(__file__)))


def _train(emoji_dir, autoencoder_dir, output_dir: Path, *extra: str) -> None:
    run(LAUNCH + ["train_ldm.py", "--config", "configs/ldm/tiny.yaml", f"data={emoji_dir}",
                  f"autoencoder={autoencoder_dir}", f"output_dir={output_dir}", "sample_every=1000",
                  "post_hoc_ema=[0.05, 0.2]", "post_hoc_ema_every=4", *extra])


@pytest.fixture(scope="module")
def post_hoc_run(emoji_dir, autoencoder_dir, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("post-hoc") / "run"
    _train(emoji_dir, autoencoder_dir, output_dir, "max_steps=12", "learning_rate=3e-3")
    return output_dir


def _snapshot_unet(run_dir: Path, profile: int, step: int) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "post-hoc-ema" / f"{profile}.{step}.pt", weights_only=True)
    return {k.removeprefix("ema_model."): v for k, v in state.items() if k.startswith("ema_model.")}


@pytest.mark.slow
def test_snapshots_are_written_every_n_steps_for_each_tracked_length(post_hoc_run):
    assert snapshot_steps(post_hoc_run / "post-hoc-ema") == [4, 8, 12]
    assert sorted(p.name for p in (post_hoc_run / "post-hoc-ema").iterdir())[:2] == ["0.12.pt", "0.4.pt"]
    assert (post_hoc_run / "checkpoints" / "step-00000012" / "post_hoc_ema.pt").is_file()
    short, long = _snapshot_unet(post_hoc_run, 0, 12), _snapshot_unet(post_hoc_run, 1, 12)
    assert any(not torch.equal(short[k], long[k]) for k in short)  # two different averages of the same weights


@pytest.mark.slow
def test_a_tracked_length_is_synthesised_back_as_itself(post_hoc_run, tmp_path):
    """Least squares over the snapshots reproduces a length that was tracked (it is one of the basis profiles)."""
    out = tmp_path / "ema-0.05"
    result = run(LDM + ["ema", str(post_hoc_run), "--sigma-rel", "0.05", "--out", str(out)])
    assert "sigma_rel 0.05" in result.stdout
    exported = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    tracked = _snapshot_unet(post_hoc_run, 0, 12)
    assert exported.keys() == tracked.keys()
    for key in exported:
        torch.testing.assert_close(exported[key], tracked[key], atol=2e-4, rtol=1e-3)
    assert json.loads((out / "post_hoc_ema.json").read_text())["sigma_rel"] == 0.05
    # the final export holds ema_decay's EMA, not the post-hoc one
    final = load_file(post_hoc_run / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.allclose(final[k], exported[k], atol=1e-4) for k in final)


@pytest.mark.slow
def test_several_lengths_are_scored_by_validation_loss_and_the_lowest_kept(post_hoc_run, tmp_path):
    out = tmp_path / "ema-best"
    result = run(LDM + ["ema", str(post_hoc_run), "--sigma-rel", "0.03", "--sigma-rel", "0.1", "--sigma-rel", "0.25",
                        "--out", str(out)])
    printed = {float(line.split()[1].rstrip(":")): float(line.split()[-1]) for line in result.stdout.splitlines()
               if line.startswith("sigma_rel") and "validation loss" in line}
    assert set(printed) == {0.03, 0.1, 0.25} and len(set(printed.values())) == 3
    record = json.loads((out / "post_hoc_ema.json").read_text())
    assert record["sigma_rel"] == min(printed, key=printed.get)
    exported = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(post_hoc_run / "final" / "unet")
    expected = synthesize(unet, post_hoc_run / "post-hoc-ema", record["sigma_rel"])
    assert all(torch.equal(exported[k], expected[k]) for k in exported)


@pytest.mark.slow
def test_a_resumed_run_writes_the_same_snapshots(emoji_dir, autoencoder_dir, post_hoc_run, tmp_path):
    resumed = tmp_path / "resumed"
    _train(emoji_dir, autoencoder_dir, resumed, "max_steps=10", "learning_rate=3e-3", "checkpoint_every=8")
    _train(emoji_dir, autoencoder_dir, resumed, "max_steps=12", "learning_rate=3e-3", "checkpoint_every=8",
           f"resume={resumed / 'checkpoints' / 'step-00000008'}")
    for profile in (0, 1):
        a, b = _snapshot_unet(post_hoc_run, profile, 12), _snapshot_unet(resumed, profile, 12)
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the step-10 snapshots of the abandoned stretch (8-10) were removed when training restarted at 8
    assert snapshot_steps(resumed / "post-hoc-ema") == [4, 8, 12]


@pytest.mark.slow
def test_bad_post_hoc_settings_are_one_line_each(post_hoc_run, tmp_path):
    base = [f"output_dir={tmp_path}", f"data={tmp_path}", "autoencoder=x"]
    for overrides, message in ((["post_hoc_ema=[0.05]"], "two or more different relative EMA lengths"),
                               (["post_hoc_ema=[0.05, 0.3]"], "relative EMA length 0.3 is outside (0, 0.2887)"),
                               (["post_hoc_ema_every=0"], "post_hoc_ema_every must be at least 1")):
        with pytest.raises(UserError) as error:
            load_config(LDMTrainConfig, "configs/ldm/tiny.yaml", base + overrides)
        assert message in str(error.value)
    from core.post_hoc_ema import record_profiles
    with pytest.raises(UserError, match=r"track lengths \[0.05, 0.2\]; this run asks for \[0.05, 0.1\]"):
        record_profiles(post_hoc_run / "post-hoc-ema", [0.05, 0.1])  # a resume with other lengths
    result = run(LDM + ["ema", str(post_hoc_run), "--sigma-rel", "0.29", "--out", str(tmp_path / "x")], check=False)
    assert result.returncode != 0 and "relative EMA length 0.29 is outside (0, 0.2887)" in result.stderr
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match=r"length 0.01 is outside what the snapshots of lengths \[0.05, 0.2\] "
                                        r"reconstruct well, \[0.02, 0.2877\]"):
        synthesize(torch.nn.Linear(1, 1), post_hoc_run / "post-hoc-ema", 0.01)
    result = run(LDM + ["ema", str(tmp_path), "--sigma-rel", "0.1", "--out", str(tmp_path / "y")], check=False)
    assert result.returncode != 0 and "has no final/config.yaml" in result.stderr


def _gamma(sigma_rel: float) -> float:
    """EDM2 eq. 3 solved for gamma by bisection: sigma_rel = sqrt((g + 1) / ((g + 2)^2 (g + 3)))."""
    low, high = 0.0, 1e6
    for _ in range(200):
        middle = (low + high) / 2
        if ((middle + 1) / ((middle + 2) ** 2 * (middle + 3))) ** 0.5 > sigma_rel:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def test_an_untracked_length_is_close_to_its_power_function_average_by_hand(tmp_path):
    """Weights following a known trajectory: the synthesised sigma_rel 0.07 (tracked: 0.05 and 0.10) against EDM2's
    power-function average of that trajectory, computed here from the paper's definition."""
    from core.post_hoc_ema import record_profiles, tracker

    torch.manual_seed(0)
    phase, speed = torch.rand(64) * 6.28, 0.5 + torch.rand(64)
    model = torch.nn.Linear(1, 64, bias=False)
    folder = tmp_path / "post-hoc-ema"
    record_profiles(folder, [0.05, 0.10])
    averages = tracker(model, [0.05, 0.10], folder)
    weights = []
    for step in range(1, 401):
        value = torch.sin(step / 40 * speed + phase) + step / 400
        with torch.no_grad():
            model.weight.copy_(value[:, None])
        weights.append(value)
        averages.update()
        if step % 20 == 0:
            averages.checkpoint()

    def by_hand(sigma_rel: float) -> torch.Tensor:  # theta_hat_t = sum_tau tau^gamma theta_tau / sum_tau tau^gamma
        gamma = _gamma(sigma_rel)
        share = torch.arange(1, 401, dtype=torch.float64) ** gamma
        return (share[:, None] * torch.stack(weights).double()).sum(0) / share.sum()

    got = synthesize(model, folder, 0.07)["weight"][:, 0].double()
    truth = by_hand(0.07)
    error = (got - truth).abs().max().item()
    # 0.0008 measured; the length 0.068 instead of 0.07 would already be 0.02 away, the tracked 0.05 and 0.10 0.2
    assert error < 0.005
    assert (by_hand(0.068) - truth).abs().max().item() > 0.01
