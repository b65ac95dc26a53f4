"""Image-caption datasets: the loader and preprocessing used by training, evaluation and the cache."""
