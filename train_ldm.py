"""Train the latent U-Net. Usage: accelerate launch train_ldm.py --config configs/ldm/emoji-64.yaml \
output_dir=runs/ldm autoencoder=runs/ae data=data/emoji [key=value ...]

`init_from=DIR` (a text-to-image model folder) starts the U-Net from that model's weights; with `inpainting: true`
(set in configs/ldm/*-inpaint.yaml) it fine-tunes an inpainting U-Net from that model instead
(recipes/inpainting.py)."""

from cli.training_args import parse_training_args
from core.config import config_values, load_config
from core.errors import exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    config_path, overrides = parse_training_args(__doc__, argv)
    if config_values(config_path, overrides).get("inpainting") is True:
        from recipes.inpainting import InpaintTrainConfig, run
        run(load_config(InpaintTrainConfig, config_path, overrides))
    else:
        from recipes.latent_diffusion import LDMTrainConfig, run
        run(load_config(LDMTrainConfig, config_path, overrides))


if __name__ == "__main__":
    main()
