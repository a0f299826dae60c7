"""Built-in synthetic data: filament volumes and SMLM-like localisations along the same
random curves, deterministic per (data.seed, split, index)."""
