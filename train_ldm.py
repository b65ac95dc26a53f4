"""Train the latent U-Net. Usage: accelerate launch train_ldm.py --config configs/ldm/emoji-64.yaml \
output_dir=runs/ldm autoencoder=runs/ae data=data/emoji [key=value ...]"""

from cli.training_args import parse_training_args
from core.config import load_config
from core.errors import exit_on_user_error
from recipes.latent_diffusion import LDMTrainConfig, run


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    config_path, overrides = parse_training_args(__doc__, argv)
    run(load_config(LDMTrainConfig, config_path, overrides))


if __name__ == "__main__":
    main()
