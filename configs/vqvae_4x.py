"""A VQ-VAE stage 1 in the main job's style (configs/balanced_4x.py): two levels /2 each,
a 4x latent of 8 channels (8 input voxels per latent value) quantised to a 256-code
codebook, no discriminator, Adam 5e-4 with b1 0.9 and cosine decay, on the built-in
filaments at 64x64x32 (a CPU-size volume; --config.data.volume_size='(256,256,64)' is the
main job's).

MONAI's VQVAE (ldm_jax/models/vqvae.py) with its rows (stride 2, kernel 4, padding 1) and
EMA codebook, plus dead-code restarts (not MONAI's): without them this model used one
code of 256 from step 10 of a filament run (perplexity 1.0: every input decodes to the
same volume); with them 146 codes at step 10 (benchmarks/QUALITY.md, "VQ-VAE against the
KL autoencoder"). docs/vqvae.md explains the fields, codebook usage, restarts and the
memory levers.
"""

from configs import default


def get_config():
    config = default.get_config()
    ae = config.autoencoder
    ae.kind = "vqvae"
    vq = ae.vqvae
    vq.channels = (32, 64)
    vq.num_res_layers = 1
    vq.num_res_channels = (32, 64)
    vq.downsample_parameters = ((2, 4, 1, 1), (2, 4, 1, 1))
    vq.upsample_parameters = ((2, 4, 1, 1, 0), (2, 4, 1, 1, 0))
    vq.num_embeddings = 256
    vq.embedding_dim = 8
    vq.decay = 0.99
    vq.restart_threshold = 1.0  # codes below one latent vector per batch (EMA) restart
    vq.restart_every = 1
    config.loss.adv_weight = 0.0  # a VQ-VAE's users pick it to train without a GAN
    config.train.learning_rate = 5e-4
    config.train.b1 = 0.9
    config.train.schedule = "cosine"
    config.data.volume_size = (64, 64, 32)
    return config
