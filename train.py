"""Train a stage: python train.py --config configs/balanced.py --workdir runs/x

The stage comes from the config (`config.stage`): configs/*.py train the autoencoder,
configs/diffusion/*.py the latent diffusion model. See `ldm_jax.cli.train`.
"""

from ldm_jax.cli.train import main

if __name__ == "__main__":
    main()
