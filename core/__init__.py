"""The foundation every stage builds on: errors, configs, safe writes and locks, images, image-caption data (loader,
shard sources, buckets, batch order), checkpoints and the one training loop.

Imports no other package of this project (tests/test_layers.py checks it).
"""
