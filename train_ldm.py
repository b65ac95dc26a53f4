"""Train the latent U-Net. Usage: accelerate launch train_ldm.py --config configs/ldm/emoji-64.yaml \
output_dir=runs/ldm autoencoder=runs/ae data=data/emoji [key=value ...]

`init_from=DIR` (a text-to-image model folder) starts the U-Net from that model's weights; with `inpainting: true`
(set in configs/ldm/*-inpaint.yaml) it fine-tunes an inpainting U-Net from that model instead
(recipes/inpainting.py); with `distill: true` (configs/ldm/*-lcm.yaml) it distils that model into a consistency
student that samples in 1-8 steps (recipes/consistency.py); with `controlnet: true` (configs/ldm/*-controlnet-*.yaml)
it trains a ControlNet that steers that model's frozen U-Net with a control map (recipes/controlnet.py)."""

from cli.training_args import ldm_config, parse_training_args, trainer_for
from core.errors import exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    trainer_for(ldm_config(*parse_training_args(__doc__, argv))).run()


if __name__ == "__main__":
    main()
