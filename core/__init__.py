"""The foundation every stage builds on: errors, configs, files, images, datasets, FID, and the one training loop.

Imports no other package of this project (tests/test_layers.py checks it).
"""
