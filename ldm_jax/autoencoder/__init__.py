"""Stage 1: the KL autoencoder's training task, losses, inference and sliding windows.

- `task`: `AutoencoderTask` (state, jitted train/eval step) for `ldm_jax.trainer`.
- `losses`, `perceptual`: reconstruction, KL, adversarial and 2.5D LPIPS losses.
- `inference`: `load_autoencoder(workdir)` -> encode/decode whole volumes.
- `sliding`: gaussian-blended sliding windows for volumes larger than one pass.
- `plan`: the per-level shape table (`ldm-jax plan`).
"""
