"""Train the noise-aware classifier for classifier guidance. Usage: accelerate launch train_classifier.py \
--config configs/classifier/emoji-64.yaml output_dir=runs/classifier [key=value ...]"""

from cli.training_args import parse_training_args
from core.config import load_config
from core.errors import exit_on_user_error
from recipes.classifier import ClassifierTrainConfig, run


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    config_path, overrides = parse_training_args(__doc__, argv)
    run(load_config(ClassifierTrainConfig, config_path, overrides))


if __name__ == "__main__":
    main()
