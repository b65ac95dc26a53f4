"""Train the first stage. Usage: accelerate launch train_autoencoder.py --config configs/autoencoder/kl-f4.yaml \
output_dir=runs/ae data=data/emoji [key=value ...]"""

from autoencoder.train import AutoencoderTrainConfig, run
from ldm.cli_args import parse_training_args
from ldm.config import load_config
from ldm.errors import exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    config_path, overrides = parse_training_args(__doc__, argv)
    run(load_config(AutoencoderTrainConfig, config_path, overrides))


if __name__ == "__main__":
    main()
