"""Stage 2: fine-tune MAISI's released rectified-flow diffusion UNet (NV-Generate-CTMR
`diff_unet_3d_rflow-ct.pt`) on the latents of a MAISI autoencoder run
(configs/maisi_finetune.py). docs/maisi.md, "Fine-tuning", is the guide.

    python train.py --config configs/diffusion/maisi_finetune.py --workdir runs/maisi_ldm \\
        --config.latents.autoencoder_workdir=runs/maisi_ae \\
        --config.unet.init_from=models/diff_unet_3d_rflow-ct.pt

The UNet is `config_network_rflow.json`'s `diffusion_unet_def` (MONAI's
DiffusionModelUNetMaisi: channels 64/128/256/512, attention on the two deepest levels with
32-channel heads, resblock up/down, include_fc, a spacing input and 128 class embeddings
for the modality); `unet.kind = "maisi"` selects it and `unet.maisi` gives the inputs
every training batch is paired with: spacing in mm (fed x100 in float16, as MAISI), the
modality class (1 = CT). With `unet.init_from` set and `latents.scale_factor` unset, the
file's scale_factor is used (the latents the released UNet was trained on). Scheduler:
MAISI's rflow training settings (1000 continuous timesteps, uniform sampling, the
resolution-dependent timestep shift). Sizes are for a GPU; on a CPU see docs/maisi.md.
"""

import ml_collections

from configs.diffusion import default


def get_config():
    config = default.get_config()
    u = config.unet
    u.kind = "maisi"
    u.in_channels = u.out_channels = 4
    u.num_channels = (64, 128, 256, 512)
    u.attention_levels = (False, False, True, True)
    u.num_head_channels = (0, 0, 32, 32)
    u.num_res_blocks = 2
    u.norm_num_groups = 32
    u.resblock_updown = True
    u.num_class_embeds = 128
    u.dtype = "float32"
    # MAISI's extras (DiffusionModelUNetMaisi's own fields).
    u.include_fc = True
    u.use_combined_linear = False
    u.include_spacing_input = True
    u.include_top_region_index_input = False
    u.include_bottom_region_index_input = False
    # The weight file to start from (MAISI's {"unet_state_dict", "scale_factor"} or a bare
    # MONAI state dict); None: random weights.
    u.init_from = ml_collections.config_dict.placeholder(str)
    # The UNet's extra inputs for every training batch and sample (MAISI's units).
    u.maisi = ml_collections.ConfigDict()
    u.maisi.spacing = (1.5, 1.5, 2.0)  # mm
    u.maisi.top_region_index = ml_collections.config_dict.placeholder(tuple)  # 4 one-hot
    u.maisi.bottom_region_index = ml_collections.config_dict.placeholder(tuple)
    u.maisi.modality = 1  # MAISI's class: 1 CT, 8 and up MR

    s = config.scheduler
    s.name = "rflow"
    s.num_train_timesteps = 1000
    s.use_discrete_timesteps = False
    s.sample_method = "uniform"
    s.scale = 1.4
    s.use_timestep_transform = True

    config.latents.autoencoder_workdir = "runs/maisi_ae"
    config.latents.autoencoder_config = "configs/maisi_finetune.py"
    t = config.train
    t.learning_rate = 1e-4
    t.batch_size = 1
    config.eval.sampling_steps = 30
    return config
