"""The foundation every stage builds on: errors, configs, safe writes and locks, images, the image-caption loader,
checkpoints and the one training loop.

Imports no other package of this project (tests/test_layers.py checks it).
"""
