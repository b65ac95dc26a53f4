"""The one training loop every stage runs: setup -> train -> export -> cleanup, with stage hooks.

Written once here: the Accelerate set-up, data order and resume position, the optimiser and its LR schedule, gradient
accumulation, clipping, the non-finite guard, EMA, logging, the sample and checkpoint cadence, and the replica checks
before export. A stage (recipes/) subclasses `Trainer` and fills in the hooks: `build_data`, `build_model`,
`compute_loss`, `make_samples`, `write_export`, and optionally `build_extras` and `after_optimizer_step`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate.utils import set_seed
from diffusers.optimization import SchedulerType, get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from core.accelerator import (all_ranks_true, assert_replicas_in_sync, endless_batches, make_accelerator,
                              setup_logging, step_is_finite)
from core.checkpoints import (load_checkpoint, lock_output_dir, resolve_resume, save_checkpoint,
                              save_trained_weights_only)
from core import post_hoc_ema
from core.config import save_config
from core.data.dataset import SkippingCollate, check_data_path
from core.errors import UserError
from core.files import atomic_folder
from core.images import pil_to_uint8_array

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """The settings every stage shares; a stage's config subclasses it (and may change defaults)."""

    output_dir: str = ""
    # an imagefolder (e.g. from `ldm data emoji`), a saved datasets.DatasetDict or a dataset name; the LDM stage also
    # reads WebDataset tar shards (path, glob or brace range) and streamed datasets (docs/data.md)
    data: str = ""
    image_column: str = "image"
    caption_column: str = "caption"
    train_split: str = "train"
    batch_size: int = 32  # per rank and per micro-batch
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    # a diffusers.optimization scheduler name, e.g. cosine (decays to 0 at max_steps), or inverse_sqrt (transformers'
    # schedule: warm-up, then lr * sqrt(lr_timescale / (step - lr_warmup_steps + lr_timescale)))
    lr_scheduler: str = "constant"
    lr_timescale: Optional[int] = None  # inverse_sqrt's time scale (default lr_warmup_steps)
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    # AdamW's kernel: torch's own choice (null: a per-tensor loop on the CPU, foreach on CUDA), for-loop, foreach
    # (one multi-tensor call per op) or fused (one kernel for the whole update); the same maths, the cost of the
    # step's optimiser part differs (benchmarks/train_throughput.py --levers)
    adam_implementation: Optional[str] = None
    use_ema: bool = True
    ema_decay: float = 0.999
    ema_foreach: bool = False  # the EMA update as multi-tensor ops (diffusers' EMAModel(foreach=True)), same maths
    # post-hoc EMA (EDM2; core/post_hoc_ema.py): relative lengths of power-function EMAs tracked beside ema_decay's,
    # e.g. [0.05, 0.10] ([] = off), snapshotted every post_hoc_ema_every steps (default checkpoint_every) into
    # output_dir/post-hoc-ema; `ldm ema RUN --sigma-rel ...` synthesises any length in between after training
    post_hoc_ema: list[float] = field(default_factory=list)
    post_hoc_ema_every: Optional[int] = None
    ddp_timeout_minutes: int = 10  # a rank that stops answering fails the others after this long
    max_steps: int = 10000
    # stop this invocation after this many minutes of training (checkpoint and export at the step reached;
    # resume=auto goes on from there): a wall-clock budget for runs planned by time, e.g. on a lent GPU
    max_minutes: Optional[float] = None
    seed: int = 0
    resume: str = "auto"  # auto | never | PATH of a checkpoint
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 1000
    num_workers: int = 0  # loader processes: training batches, and decoding images in the LDM's cache build
    max_nonfinite_steps: int = 10
    # the validation loss (docs/training.md#validation-loss): the EMA weights on held-out images with noise and
    # timesteps fixed per image, so it is comparable across steps and runs; logged as val/loss
    validation_split: str = "validation"  # the data's held-out split, used when the data has one
    validation_fraction: float = 0.0  # without such a split: this share of the training images held out (seeded)
    validation_every: Optional[int] = None  # steps; default checkpoint_every (and once before the first step)
    validation_max_images: int = 256  # evaluated held-out images at most (an evenly spaced, fixed subset)
    keep_best: bool = False  # also export the weights of the lowest validation loss as output_dir/best
    # Accelerate trackers, several allowed: tensorboard, wandb, mlflow, ... (wandb runs offline unless WANDB_MODE
    # says otherwise; mlflow writes under output_dir/logs unless MLFLOW_TRACKING_URI is set)
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])

    def needs_data(self) -> bool:
        """Whether `data` is required (a recipe that trains on other inputs says no)."""
        return True

    def validate(self) -> None:
        """Checks that need no file or model: run before anything is loaded."""
        if not self.output_dir:
            raise UserError("output_dir is required: add output_dir=DIR")
        if self.needs_data() and not self.data:
            raise UserError("data is required: add data=DIR (an imagefolder, e.g. built by `ldm data emoji`)")
        if self.data:
            check_data_path(self.data)
        for key in ("batch_size", "gradient_accumulation_steps", "max_steps", "checkpoint_every", "log_every",
                    "sample_every", "max_nonfinite_steps", "ddp_timeout_minutes"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.learning_rate <= 0:
            raise UserError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.post_hoc_ema:
            post_hoc_ema.check_sigma_rels(self.post_hoc_ema)
        if self.post_hoc_ema_every is not None and self.post_hoc_ema_every < 1:
            raise UserError(f"post_hoc_ema_every must be at least 1, got {self.post_hoc_ema_every}")
        if self.adam_implementation not in list(ADAM_IMPLEMENTATIONS):  # a list: not hashable, still refused
            raise UserError(f"unknown adam_implementation '{self.adam_implementation}'; valid: null (torch's choice), "
                            f"{', '.join(i for i in ADAM_IMPLEMENTATIONS if i)}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise UserError(f"unknown lr_scheduler '{self.lr_scheduler}'; valid: {', '.join(LR_SCHEDULERS)}")
        if self.lr_warmup_steps < 0:
            raise UserError(f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        if self.lr_scheduler == "constant" and self.lr_warmup_steps:
            raise UserError(f"lr_scheduler=constant has no warm-up (lr_warmup_steps={self.lr_warmup_steps} would be "
                            "ignored): use constant_with_warmup, or lr_warmup_steps=0")
        if self.lr_scheduler == "inverse_sqrt" and (self.lr_timescale or self.lr_warmup_steps) < 1:
            raise UserError("lr_scheduler=inverse_sqrt needs a time scale: lr_timescale >= 1 (default "
                            "lr_warmup_steps)")
        if self.lr_timescale is not None and self.lr_scheduler != "inverse_sqrt":
            raise UserError(f"lr_timescale is inverse_sqrt's; lr_scheduler={self.lr_scheduler} would ignore it")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise UserError(f"max_minutes must be positive (or null for no limit), got {self.max_minutes}")
        if not 0 <= self.validation_fraction < 1:
            raise UserError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        for key in ("validation_every", "validation_max_images"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise UserError(f"{key} must be at least 1, got {getattr(self, key)}")
        check_trackers(self.log_with)


ADAM_IMPLEMENTATIONS = {None: {}, "for-loop": {"foreach": False}, "foreach": {"foreach": True},
                        "fused": {"fused": True}}
# diffusers' schedulers that need nothing beyond warm-up and length (piecewise_constant needs rules), and inverse_sqrt
LR_SCHEDULERS = (*(s.value for s in SchedulerType if s.value != "piecewise_constant"), "inverse_sqrt")


def make_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int,
                      timescale: int | None = None):
    """diffusers' schedulers by name; inverse_sqrt from transformers (diffusers has none): linear warm-up over
    `warmup_steps`, then lr * sqrt(timescale / (step - warmup_steps + timescale)), timescale default warmup_steps."""
    if name == "inverse_sqrt":
        from transformers.optimization import get_inverse_sqrt_schedule

        return get_inverse_sqrt_schedule(optimizer, num_warmup_steps=warmup_steps,
                                         timescale=timescale or warmup_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps)


def check_trackers(names: list[str]) -> None:
    """Every `log_with` name is one of Accelerate's trackers and installed here."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    if not isinstance(names, list) or not names:
        raise UserError(f"log_with must be a list of trackers, e.g. [tensorboard], got {names!r}")
    installed = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise UserError(f"unknown tracker '{name}' in log_with; valid: {', '.join(LOGGER_TYPE_TO_CLASS)}")
        if name not in installed:
            raise UserError(f"log_with={name} needs its package, which is not installed: pip install {name}")


def trained_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimiser and the EMA see (all of them, or e.g. only a LoRA adapter's)."""
    return [p for p in model.parameters() if p.requires_grad]


class NonFiniteGuard:
    """Counts NaN / inf losses in a row; the step is skipped, and after `max_in_row` the run stops clearly."""

    def __init__(self, max_in_row: int) -> None:
        self.max_in_row, self.in_row, self.total = max_in_row, 0, 0  # total is restored on resume

    def check(self, finite: bool, step: int) -> bool:
        """Pass through `finite` (train on the step) after counting; raises after too many bad steps in a row."""
        if finite:
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        logger.warning("non-finite loss at step %d (%d in a row, %d in total); step skipped", step, self.in_row,
                       self.total)
        if self.in_row >= self.max_in_row:
            raise UserError(f"loss was NaN/inf for {self.in_row} steps in a row (at step {step}); stopping without "
                            "saving. Lower learning_rate, or resume from the last checkpoint")
        return False


class Trainer:
    """The loop. Read `setup`, then `train`; one optimiser step is `train_step`. Subclasses fill in the hooks."""

    name = "train"  # progress bar label and TensorBoard project

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    # ---- hooks -------------------------------------------------------------------------------------------------
    def build_data(self) -> tuple[torch.utils.data.Dataset, Callable]:
        """The training dataset and its collate function (`self.collate` skips undecodable images)."""
        raise NotImplementedError

    def build_loader(self, dataset: torch.utils.data.Dataset, collate: Callable) -> tuple[torch.utils.data.DataLoader,
                                                                                            bool]:
        """The training loader, and whether Accelerate should prepare it (split it across ranks, place batches).
        Default: shuffled full batches from Accelerate's seedable sampler."""
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.config.batch_size, shuffle=True, drop_last=True,
                                             num_workers=self.config.num_workers, collate_fn=collate,
                                             generator=torch.Generator().manual_seed(self.config.seed))
        return loader, True

    def build_model(self) -> nn.Module:
        """The module to train (DDP wraps it). Its `requires_grad` parameters go to the optimiser, the EMA and the
        checkpoints; frozen ones (a LoRA's base) stay out of all three."""
        raise NotImplementedError

    def build_extras(self) -> None:
        """After the model is prepared and before the per-rank seed: anything else with weights (a discriminator)."""

    def compute_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """The batch's losses; "loss" is backpropagated, every entry is logged (mean over ranks)."""
        raise NotImplementedError

    def after_optimizer_step(self, batch: dict, losses: dict[str, torch.Tensor]) -> None:
        """Runs after each optimiser step that was taken (e.g. the discriminator's own step)."""

    def make_samples(self) -> tuple[str, Image.Image]:
        """A (TensorBoard tag, grid) made with `inference_model()`, on the main process only."""
        raise NotImplementedError

    def write_export(self, folder: Path) -> None:
        """Write the inference export into `folder` (config.yaml is added by `export`)."""
        raise NotImplementedError

    def build_validation(self) -> list[dict]:
        """Held-out batches, fixed for the run and small (built once, kept on the device); [] = no validation."""
        return []

    def validation_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Per-image losses of `model` on one held-out batch. Random draws (noise, masks) come from torch's RNG,
        seeded per batch by `validate`, so they are the same at every step and in every run."""
        raise NotImplementedError

    # ---- the loop ----------------------------------------------------------------------------------------------
    def setup(self) -> None:
        config = self.config
        self.accelerator = make_accelerator(config.output_dir, config.gradient_accumulation_steps,
                                            config.ddp_timeout_minutes, config.log_with)
        setup_logging(self.accelerator)
        self.run_lock = lock_output_dir(self.accelerator, config.output_dir)
        resume_from = resolve_resume(config.output_dir, config.resume)
        self.collate = SkippingCollate()
        loader, prepare_loader = self.build_loader(*self.build_data())

        set_seed(config.seed)  # the same initial weights on every rank, whatever ran before
        model = self.build_model()
        trainable = trained_parameters(model)
        logger.info("%s: %.2fM parameters, %.2fM trained", type(model).__name__,
                    sum(p.numel() for p in model.parameters()) / 1e6, sum(p.numel() for p in trainable) / 1e6)
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                      eps=config.adam_epsilon, weight_decay=config.weight_decay,
                                      **ADAM_IMPLEMENTATIONS[config.adam_implementation])
        # stepped by us once per optimiser step (a prepared scheduler would step once per process)
        self.lr_scheduler = make_lr_scheduler(config.lr_scheduler, optimizer, config.lr_warmup_steps, config.max_steps,
                                              config.lr_timescale)
        if prepare_loader:
            self.model, self.optimizer, self.loader = self.accelerator.prepare(model, optimizer, loader)
        else:
            (self.model, self.optimizer), self.loader = self.accelerator.prepare(model, optimizer), loader
        self.build_extras()
        self.ema = None
        if len(trainable) < len(list(model.parameters())):  # e.g. LoRA: checkpoints hold the adapter alone
            save_trained_weights_only(self.accelerator)
        if config.use_ema:  # EMA of every rank starts from the same (prepared, rank-0-broadcast) weights
            self.ema = EMAModel(trainable, decay=config.ema_decay, use_ema_warmup=True, power=3 / 4,
                                foreach=config.ema_foreach)
            self.ema.to(self.accelerator.device)
        self.post_hoc = None  # kept alike on every rank (each sees the same weights), snapshotted by the main one
        if config.post_hoc_ema:
            if self.accelerator.is_main_process:
                post_hoc_ema.record_profiles(Path(config.output_dir) / post_hoc_ema.SNAPSHOT_FOLDER, config.post_hoc_ema)
            self.post_hoc = post_hoc_ema.tracker(self.accelerator.unwrap_model(self.model), config.post_hoc_ema,
                                                 Path(config.output_dir) / post_hoc_ema.SNAPSHOT_FOLDER)
        set_seed(config.seed, device_specific=True)  # each rank draws its own noise, timesteps and dropout

        self.validation_batches = self.build_validation()
        self.step, self.batches_seen, self.skipped_images = 0, 0, 0
        self.best_validation_loss = math.inf
        self.guard = NonFiniteGuard(config.max_nonfinite_steps)
        if resume_from is not None:
            state = load_checkpoint(self.accelerator, resume_from, self.checkpointed_states())
            self.step, self.batches_seen = state["step"], state["batches_seen"]
            self.guard.total = state.get("nonfinite_steps", 0)
            self.skipped_images = state.get("skipped_images", 0)
            best = state.get("best_validation_loss")
            self.best_validation_loss = math.inf if best is None else best
            if self.ema is not None:  # its state loads onto the CPU
                self.ema.to(self.accelerator.device)
            logger.info("resumed from %s at step %d", resume_from, self.step)
        if self.post_hoc is not None and self.accelerator.is_main_process:
            post_hoc_ema.drop_snapshots_after(Path(config.output_dir) / post_hoc_ema.SNAPSHOT_FOLDER, self.step)
        self.accelerator.init_trackers(self.name, config={k: v for k, v in dataclasses.asdict(config).items()
                                                          if isinstance(v, (int, float, str, bool))})
        if self.step == 0:
            self.validate()  # where the run starts from: the base's loss for a fine-tune

    def train_step(self, batch: dict) -> dict[str, torch.Tensor] | None:
        """Forward + backward on one batch; at the end of an accumulation cycle, one optimiser step.

        Returns the losses after an optimiser step, None while accumulating or when the step was skipped. A
        non-finite gradient norm (identical on every rank after DDP's all-reduce) skips the step on every rank.
        """
        with self.accelerator.accumulate(self.model):
            losses = self.compute_loss(batch)
            self.accelerator.backward(losses["loss"])
            if not self.accelerator.sync_gradients:
                return None
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
            stepped = self.guard.check(step_is_finite(self.accelerator, grad_norm, losses["loss"]), self.step)
            if stepped:
                self.optimizer.step()
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if not stepped:
            return None
        if self.ema is not None:
            self.ema.step(trained_parameters(self.model))
        if self.post_hoc is not None:
            self.post_hoc.update()
        self.after_optimizer_step(batch, losses)
        return losses

    def train(self) -> None:
        config = self.config
        batches = endless_batches(self.accelerator, self.loader, self.batches_seen)
        progress = tqdm(total=config.max_steps, initial=self.step, desc=self.name, unit="step",
                        disable=not self.accelerator.is_main_process)
        images_per_step = config.batch_size * config.gradient_accumulation_steps * self.accelerator.num_processes
        last_time, last_step, skipped_warned = time.perf_counter(), self.step, self.skipped_images
        deadline = None if config.max_minutes is None else time.perf_counter() + 60 * config.max_minutes
        while self.step < config.max_steps:
            batch = next(batches)
            self.batches_seen += 1
            # a batch in which no image decoded comes as None: all batch_size rows skipped (drop_last=True)
            self.skipped_images += batch.pop("skipped", 0) if batch is not None else config.batch_size
            if not all_ranks_true(self.accelerator, batch is not None):
                continue
            losses = self.train_step(batch)
            if losses is None:
                continue
            self.step += 1
            progress.update(1)
            if self.skipped_images > skipped_warned:
                logger.warning("skipped %d undecodable images so far", self.skipped_images)
                skipped_warned = self.skipped_images
            if self.step % config.log_every == 0 or self.step == config.max_steps:
                now = time.perf_counter()
                images_per_second = (self.step - last_step) * images_per_step / max(now - last_time, 1e-9)
                last_time, last_step = now, self.step
                gathered = self.accelerator.gather({k: v.detach().float().reshape(1) for k, v in losses.items()})
                logged = {k: v.mean().item() for k, v in gathered.items()}
                self.accelerator.log({**{f"train/{k}": v for k, v in logged.items()},
                                      "train/lr": self.lr_scheduler.get_last_lr()[0],
                                      "train/images_per_second": images_per_second}, step=self.step)
                progress.set_postfix(loss=f"{logged['loss']:.4g}", img_s=f"{images_per_second:.1f}")
            # every rank stops at the same step once any rank is past the deadline
            out_of_time = deadline is not None and not all_ranks_true(self.accelerator,
                                                                      time.perf_counter() < deadline)
            last = self.step == config.max_steps or out_of_time
            if self.step % (config.validation_every or config.checkpoint_every) == 0 or last:
                self.validate()
            if self.step % config.sample_every == 0 or last:
                self.save_samples()
            if self.post_hoc is not None and self.accelerator.is_main_process and \
                    (self.step % (config.post_hoc_ema_every or config.checkpoint_every) == 0 or last):
                self.post_hoc.checkpoint()
            if self.step % config.checkpoint_every == 0 or last:
                self.save_checkpoint()
            if out_of_time:
                logger.info("max_minutes=%g reached at step %d of %d: exporting this step (resume=auto goes on)",
                            config.max_minutes, self.step, config.max_steps)
                break
        progress.close()

    def inference_model(self) -> nn.Module:
        """An eval-mode copy of the trained module with the EMA weights (or the raw weights without EMA)."""
        model = copy.deepcopy(self.accelerator.unwrap_model(self.model)).eval()
        if self.ema is not None:
            self.ema.copy_to(trained_parameters(model))
        return model

    @torch.no_grad()
    def save_samples(self) -> None:
        """The stage's sample grid as `samples/step-XXXXXXXX.png` and in TensorBoard (main process only)."""
        if not self.accelerator.is_main_process:
            return
        tag, grid = self.make_samples()
        folder = Path(self.config.output_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(folder / f"step-{self.step:08d}.png")
        if "tensorboard" in self.config.log_with:
            tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
            tracker.add_image(tag, pil_to_uint8_array(grid), self.step, dataformats="HWC")

    @torch.no_grad()
    def validate(self) -> float | None:
        """The mean validation loss of the EMA weights, logged as val/loss; batches are dealt to ranks and summed.
        With keep_best, a new lowest loss exports these weights as output_dir/best."""
        if not self.validation_batches:
            return None
        loss, count = self.validation_loss_of(self.inference_model())
        self.accelerator.log({"val/loss": loss}, step=self.step)
        logger.info("step %d: validation loss %.5f over %d images", self.step, loss, count)
        if self.config.keep_best and loss < self.best_validation_loss:
            self.export("best", {"step": self.step, "validation_loss": loss})
        self.best_validation_loss = min(self.best_validation_loss, loss)
        return loss

    @torch.no_grad()
    def validation_loss_of(self, model: nn.Module) -> tuple[float, int]:
        """(mean validation loss of `model`, images): the fixed held-out batches dealt to ranks, summed."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        total = torch.zeros(2, dtype=torch.float64, device=self.accelerator.device)
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        for b in range(rank, len(self.validation_batches), world):
            with torch.random.fork_rng(devices=devices):  # the training RNG stream is left as it was
                torch.manual_seed(self.config.seed * 1_000_003 + b)
                losses = self.validation_loss(model, self.validation_batches[b])
            total += torch.stack([losses.double().sum(), torch.tensor(float(len(losses)), dtype=torch.float64,
                                                                      device=total.device)])
        total = self.accelerator.reduce(total, reduction="sum")
        return (total[0] / total[1]).item(), int(total[1].item())

    def setup_scoring(self) -> None:
        """What `validation_loss_of` needs, without training state: the accelerator, the data (its cache) and the
        held-out batches (`ldm ema` scores synthesised EMA lengths with it; nothing is logged or written)."""
        config = self.config
        self.accelerator = make_accelerator(config.output_dir, config.gradient_accumulation_steps,
                                            config.ddp_timeout_minutes, config.log_with)
        setup_logging(self.accelerator)
        self.collate = SkippingCollate()
        self.build_data()
        self.validation_batches = self.build_validation()

    def checkpointed_states(self) -> dict:
        """What the checkpoint holds beside Accelerate's state, by file name: the LR schedule and the EMA (saved and
        loaded by us with `weights_only=True`; Accelerate would unpickle registered objects in full)."""
        return {"lr_scheduler": self.lr_scheduler, **({"ema": self.ema} if self.ema is not None else {}),
                **({"post_hoc_ema": self.post_hoc} if self.post_hoc is not None else {})}

    def save_checkpoint(self) -> None:
        path = save_checkpoint(self.accelerator, self.config.output_dir, self.step, self.config,
                               self.checkpointed_states(),
                               {"batches_seen": self.batches_seen, "skipped_images": self.skipped_images,
                                "nonfinite_steps": self.guard.total,
                                "best_validation_loss": None if math.isinf(self.best_validation_loss)
                                else self.best_validation_loss}, self.config.keep_checkpoints)
        logger.info("saved checkpoint %s", path)

    @torch.no_grad()
    def export(self, name: str = "final", record: dict | None = None) -> Path:
        """`output_dir/NAME` (final, or best), written atomically from the EMA weights after checking every rank
        holds the same; `record` is written beside them as validation.json."""
        final = Path(self.config.output_dir) / name
        assert_replicas_in_sync(self.accelerator, self.model.parameters(), "model weights")
        if self.ema is not None:
            assert_replicas_in_sync(self.accelerator, self.ema.shadow_params, "EMA weights")
        if self.accelerator.is_main_process:
            # the run's own export: replaced on resume; a folder without an export's config.yaml is refused
            with atomic_folder(final, overwrite=True, replaceable=lambda p: (p / "config.yaml").is_file(),
                               what="training export") as tmp:
                self.write_export(tmp)
                save_config(self.config, tmp / "config.yaml")
                if record is not None:
                    (tmp / "validation.json").write_text(json.dumps(record, indent=2) + "\n")
            logger.info("exported to %s", final)
        self.accelerator.wait_for_everyone()
        return final

    def cleanup(self) -> None:
        self.accelerator.end_training()
        self.run_lock.release()

    def run(self) -> Path:
        """setup -> train -> export -> cleanup; returns the export folder. The output_dir's lock is released however
        the run ends (a killed run's kernel lock dies with it, so the next run takes it at once)."""
        try:
            self.setup()
            self.train()
            final = self.export()
            self.cleanup()
        finally:
            if getattr(self, "run_lock", None) is not None:
                self.run_lock.release()
        return final
