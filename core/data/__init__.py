"""Datasets: the offline emoji corpus builder and the image-caption loader used by both training stages."""
