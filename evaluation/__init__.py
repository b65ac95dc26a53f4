"""Evaluation, one module per `ldm eval` command: the autoencoder's reconstructions, generation (FID, alignment,
sweeps), inpainting (the LaMa protocol), classifier guidance and the variational bound; with the offline FID network
and the real images' feature cache they share. Above the pipelines it measures, below the `ldm` command."""
