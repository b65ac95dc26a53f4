"""Helpers the end-to-end tests share: the real commands run as subprocesses, TensorBoard scalars read back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCH = [str(BIN / "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]
TWO_RANKS = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no"]  # with env ACCELERATE_USE_CPU=1 on a CPU machine


def run(args: list[str], check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **(env or {})}
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def scalars(output_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted((output_dir / "logs").rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values += [e.value for e in accumulator.Scalars(tag)]
    return values


def count_denoiser_calls(pipe) -> list[int]:
    """Wrap `pipe.denoiser` so that every U-Net call appends its batch size to the returned list."""
    calls, real = [], pipe.denoiser

    def counting(x, t, context):
        calls.append(x.shape[0])
        return real(x, t, context)

    pipe.denoiser = counting
    return calls


def write_random_adapter(folder: Path, unet, base_model: str, seed: int, std: float, fingerprint_from=None) -> Path:
    """A LoRA adapter on a copy of `unet` (attention projections, rank 4) whose B matrices are seeded N(0, std) (a
    visible change), written as training writes one; it records `unet` as its base, or `fingerprint_from`'s."""
    import copy

    import torch

    from ldm.lora import add_lora, base_fingerprint, write_adapter

    fingerprint = base_fingerprint(fingerprint_from or unet)
    unet = copy.deepcopy(unet)
    add_lora(unet, 4, 4, ["to_q", "to_k", "to_v", "to_out.0"])
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    folder.mkdir(parents=True)
    write_adapter(folder, unet, {"base_model": base_model, "base_fingerprint": fingerprint})
    return folder


def page_component(app, elem_id: str):
    """The component of a built page (`web.app.build_app`) with this elem_id, or None: what the page offers, read
    without a browser."""
    found = [block for block in app.blocks.values() if getattr(block, "elem_id", None) == elem_id]
    assert len(found) <= 1, f"{len(found)} components share elem_id {elem_id}"
    return found[0] if found else None


def dropdown_values(component) -> list:
    """A gradio Dropdown's choices as values (gradio stores them as (label, value) pairs)."""
    return [choice[1] if isinstance(choice, (tuple, list)) else choice for choice in component.choices]
