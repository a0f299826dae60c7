"""Stage 1: fine-tune MAISI's released autoencoder (NV-Generate-CTMR `autoencoder_v1.pt`) on
your CT volumes. docs/maisi.md, "Fine-tuning", is the guide.

    python train.py --config configs/maisi_finetune.py --workdir runs/maisi_ae \\
        --config.autoencoder.init_from=models/autoencoder_v1.pt \\
        --config.data.train_dir=/data/ct

The network is `config_network_rflow.json`'s `autoencoder_def` (MONAI's AutoencoderKlMaisi:
channels 64/128/256, two res blocks per level, 4 latent channels, 4x per axis, no attention,
norm_float16 as released), in the `autoencoder` section's MONAI names; `autoencoder.kind =
"maisi"` selects it (`ldm_jax.autoencoder.maisi_task`). The loss follows MAISI's
autoencoder training (`scripts/train_autoencoder.py`'s defaults as far as this loop has
them): L1 reconstruction, KL 1e-7, PatchGAN (3 layers, 32 channels, instance norm) at 0.1,
learning rate 1e-4; its perceptual term (0.3, a 2.5D "squeeze" network) is left out here
(`loss.perceptual_weight` enables our 2.5D LPIPS instead). The data window is MAISI's CT
one: HU [-1000, 1000] -> [0, 1], 64^3 patches. These sizes are for a GPU; on a CPU see the
tiny command in docs/maisi.md.
"""

import ml_collections

from configs import default


def get_config():
    config = default.get_config()
    ae = config.autoencoder
    ae.kind = "maisi"
    ae.in_channels = ae.out_channels = 1
    ae.num_channels = (64, 128, 256)
    ae.num_res_blocks = (2, 2, 2)
    ae.latent_channels = 4
    ae.norm_num_groups = 32
    ae.norm_eps = 1e-6
    ae.attention_levels = (False, False, False)
    ae.with_encoder_nonlocal_attn = False
    ae.with_decoder_nonlocal_attn = False
    ae.use_convtranspose = False
    # MAISI's extras (AutoencoderKlMaisi's own fields).
    ae.include_fc = False
    ae.use_combined_linear = False
    ae.norm_float16 = True  # as released: normalised activations rounded to float16
    ae.dtype = "float32"
    # The weight file to start from (MAISI's autoencoder_v1.pt, a bare MONAI state dict or
    # {"unet_state_dict": ...}); None: random weights.
    ae.init_from = ml_collections.config_dict.placeholder(str)

    d = config.discriminator
    d.num_layers_d, d.num_channels, d.norm, d.dtype = 3, 32, "instance", "float32"

    data = config.data
    data.source = "nifti"
    data.volume_size = (64, 64, 64)
    data.a_min, data.a_max, data.b_min, data.b_max, data.clip = -1000.0, 1000.0, 0.0, 1.0, True

    loss = config.loss
    loss.recon = "l1"
    loss.kl_weight = 1e-7
    loss.adv_weight = 0.1
    loss.adv_warmup_steps = 0
    loss.perceptual_weight = 0.0

    t = config.train
    t.learning_rate = 1e-4
    t.disc_learning_rate = 1e-4
    t.batch_size = 1
    return config
