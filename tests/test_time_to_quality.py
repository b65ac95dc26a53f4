"""The time-to-quality benchmark's quick form: every arm kind through the real `accelerate launch`, scored by
`ldm eval generate`, continued after an interruption, one table and one plot."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.slow
def test_quick_form_trains_scores_and_resumes(emoji_dir, autoencoder_dir, tmp_path):
    out = tmp_path / "ttq"
    command = [sys.executable, "benchmarks/time_to_quality.py", "--quick", "--autoencoder", str(autoencoder_dir),
               "--data", str(emoji_dir), "--arms", "diffusers,post-hoc-ema,flow", "--segment", "0.05", "--num-images", "16",
               "--steps", "2", "--ema-lengths", "0.05,0.12", "--parallel", "3", "--out", str(out)]
    first = subprocess.run([*command, "--budget", "0.05"], cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [len(a["rows"]) for a in metrics["arms"].values()] == [1, 1, 1]
    # other settings on the same --out are refused; a larger budget continues the run
    other = [*command, "--budget", "0.1", "--guidance", "2"]
    assert "other settings" in subprocess.run(other, cwd=ROOT, capture_output=True, text=True).stderr
    first_flow = metrics["arms"]["flow"]["rows"][0]
    # a malformed --replay is refused before any arm trains
    for spec in ("flow:first", "flow:0"):
        bad = subprocess.run([*command, "--budget", "0.1", "--replay", spec], cwd=ROOT, capture_output=True,
                             text=True)
        assert bad.returncode != 0 and f"--replay {spec}" in bad.stderr
    assert json.loads((out / "metrics.json").read_text()) == metrics
    flow_first_export = tmp_path / "flow-final-1"  # flow's segment-1 export, for a stop a segment later (below)
    shutil.copytree(out / "flow" / "final", flow_first_export)
    # a stop between the diffusers arm's checkpoint and its export (its final/ not yet written, its score not taken):
    # the next run exports that checkpoint and scores it, the same weights, so the same FID
    first_diffusers = metrics["arms"]["diffusers"]["rows"].pop()
    (out / "metrics.json").write_text(json.dumps(metrics))
    shutil.rmtree(out / "diffusers" / "final")
    # a replay of the flow arm to its first scored step trains the same weights again: the same FID, to the digit
    second = subprocess.run([*command, "--budget", "0.1", "--replay", f"flow:{first_flow['step']}"], cwd=ROOT,
                            capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    [replayed] = metrics["arms"]["flow"]["replayed"]
    assert "diffusers's final/ is missing or behind its last checkpoint" in second.stdout
    redone = metrics["arms"]["diffusers"]["rows"][0]
    assert (redone["step"], redone["fid"]) == (first_diffusers["step"], first_diffusers["fid"])
    assert first_flow["beside"] == ["diffusers", "post-hoc-ema"]  # trained side by side, replayed alone
    assert replayed["step"] == first_flow["step"] and replayed["fid"] == first_flow["fid"]
    assert replayed["minutes"] == pytest.approx(first_flow["minutes"], abs=1e-3)
    # a stop between flow's segment-2 checkpoint and its export leaves final/ a segment behind (freshly written
    # files, so their times say nothing): exported again from the checkpoint, it scores what segment 2 scored
    second_flow = metrics["arms"]["flow"]["rows"].pop()
    (out / "metrics.json").write_text(json.dumps(metrics))
    shutil.rmtree(out / "flow" / "final")
    shutil.copytree(flow_first_export, out / "flow" / "final", copy_function=shutil.copy)
    (out / "flow" / "exported-step.txt").write_text(f"{first_flow['step']}\n")
    third = subprocess.run([*command, "--budget", "0.1"], cwd=ROOT, capture_output=True, text=True)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "flow's final/ is missing or behind its last checkpoint" in third.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    redone = metrics["arms"]["flow"]["rows"][1]
    assert (redone["step"], redone["fid"]) == (second_flow["step"], second_flow["fid"]) != (first_flow["step"],
                                                                                             first_flow["fid"])
    for name, arm in metrics["arms"].items():
        rows = arm["rows"]  # the segments alone (replays are kept apart)
        assert [r["training_minutes"] for r in rows] == [0.05, 0.1], name
        assert [r["minutes"] for r in rows] == [round(arm["cache_minutes"] + m, 3) for m in (0.05, 0.1)]
        assert rows[1]["step"] > rows[0]["step"] > 0 and all(r["fid"] > 0 for r in rows)
        assert rows[1]["images"] == rows[1]["step"] * (16 if name == "diffusers" else 8)
    assert metrics["arms"]["diffusers"]["cache_minutes"] == 0 < metrics["arms"]["post-hoc-ema"]["cache_minutes"]
    diffusers_config = (out / "diffusers" / "final" / "config.yaml").read_text()
    assert "cache_latents: false" in diffusers_config and "use_ema: false" in diffusers_config
    assert json.loads((out / "post-hoc" / "post-hoc-ema-2" / "post_hoc_ema.json").read_text())["sigma_rel"] in (0.05,
                                                                                                             0.12)
    assert "prediction_type: flow" in (out / "flow" / "final" / "config.yaml").read_text()  # scored by flow-euler
    assert "| diffusers |" in (out / "table.md").read_text() and (out / "fid-vs-minutes.png").stat().st_size > 1000


def test_the_headline_brackets_when_each_arm_reached_the_diffusers_arms_final_fid(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from time_to_quality import all_rows, interpolated_minutes, minutes_to_reach, table

    rows = lambda minutes, fids, step=100, cache=0.0: [  # noqa: E731
        {"minutes": m, "training_minutes": m - cache, "step": step * (i + 1), "images": 0, "fid": f}
        for i, (m, f) in enumerate(zip(minutes, fids))]
    diffusers = rows([8, 16, 24], [300.0, 250.0, 200.0])
    shipped = rows([12.5, 20.5, 28.5], [180.0, 120.0, 100.0], step=400, cache=4.5)
    late = rows([8, 16, 24], [260.0, 210.0, 199.0])
    assert minutes_to_reach(shipped, 200.0, start=4.5) == (4.5, 12.5)  # before its first score: only a bracket
    assert minutes_to_reach(late, 200.0) == (16, 24)
    assert minutes_to_reach(late, 150.0) is None
    text = table({"settings": {"num_images": 500}, "arms": {
        "diffusers": {"rows": diffusers, "cache_minutes": 0}, "shipped": {"rows": shipped, "cache_minutes": 4.5},
        "never": {"rows": rows([8], [250.0]), "cache_minutes": 0}}})
    assert "| diffusers | 24.0 | 0 | 4.80 | 200.0 | 200.0 | 16.0-24.0 | 0.67-1.00 | 1.00 |" in text
    assert "| shipped | 28.5 | 0 | 1.20 | 100.0 | 100.0 | 4.5-12.5 | 0.19-0.52 | - |" in text  # first score: no line
    assert "| never | 8.0 | 0 | 4.80 | 250.0 | 250.0 | - | - | - |" in text
    assert interpolated_minutes(late, 230.0) == pytest.approx(8 + 8 * 30 / 50)
    # a replayed earlier step narrows the bracket; the table's last row stays the last segment
    replayed = {"minutes": 8.5, "training_minutes": 4.0, "step": 200, "images": 0, "fid": 190.0, "replayed": True}
    arm = {"rows": shipped, "replayed": [replayed], "cache_minutes": 4.5}
    assert [r["minutes"] for r in all_rows(arm)] == [8.5, 12.5, 20.5, 28.5]
    assert minutes_to_reach(all_rows(arm), 200.0, start=4.5) == (4.5, 8.5)
    text = table({"settings": {"num_images": 500}, "arms": {"diffusers": {"rows": diffusers, "cache_minutes": 0},
                                                            "shipped": arm}})
    assert "| shipped | 28.5 | 0 | 1.20 | 100.0 | 100.0 | 4.5-8.5 | 0.19-0.35 | - |" in text
