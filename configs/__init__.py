"""The Hydra configs, shipped as package data (``core.paths.config_dir`` finds them)."""
