"""The command line: the `ldm` command (cli/main.py) and the training scripts' argument parser."""
