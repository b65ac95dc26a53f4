"""Image-caption data: the loader, shard sources (tars, folders, streamed datasets), aspect-ratio buckets, the
batch sampler and row reads used by training, evaluation and the latent cache."""
