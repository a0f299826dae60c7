"""Defaults for stage 2 (latent diffusion); variants import this and change a few fields.

The UNet is MONAI's `DiffusionModelUNet` (names and meanings kept; `num_channels` is
MONAI's `channels`) with the 3D LDM tutorial's settings; the scheduler fields are MONAI's
DDPM / DDIM / RFlow scheduler arguments with the tutorial's values. Latents are
channels-last `(batch, X, Y, Z, C)`.
"""

import ml_collections

from configs import default as stage1


def get_config():
    config = ml_collections.ConfigDict()
    config.stage = "diffusion"

    # --- Diffusion UNet (MONAI DiffusionModelUNet, spatial_dims=3). ---
    # Defaults: the MONAI 3D LDM tutorial UNet (2,974,051 parameters).
    unet = config.unet = ml_collections.ConfigDict()
    unet.in_channels = 3  # = the autoencoder's latent_channels
    unet.out_channels = 3  # = in_channels for epsilon / v / sample prediction
    # One entry per level; every entry must divide by norm_num_groups. Each latent axis must
    # divide by 2^(levels - 1) (validate_unet says which padded shape works).
    unet.num_channels = (32, 64, 64)
    # Resnets per down level (up levels get one more); an int or one per level. Fields that
    # take "an int or a sequence" are object-typed FieldReferences so both are accepted.
    unet.num_res_blocks = ml_collections.FieldReference(1, field_type=object)
    unet.attention_levels = (False, True, True)  # attention after each resnet of a level
    # Channels per attention head: an int or one per level (0 where a level has no
    # attention). The middle block always has attention, with the last entry.
    unet.num_head_channels = ml_collections.FieldReference((0, 64, 64), field_type=object)
    unet.norm_num_groups = 32  # GroupNorm groups everywhere
    unet.norm_eps = 1e-6  # GroupNorm epsilon
    unet.resblock_updown = False  # True: resample inside resnets (avg-pool / nearest)
    # Cross-attention conditioning: SpatialTransformers instead of plain attention, keys and
    # values from a context (B, S, cross_attention_dim). Both set, or neither.
    unet.with_conditioning = False
    unet.cross_attention_dim = ml_collections.config_dict.placeholder(int)
    unet.transformer_num_layers = 1  # transformer blocks per SpatialTransformer
    # Class conditioning: an embedding of class_labels (B,) added to the time embedding.
    unet.num_class_embeds = ml_collections.config_dict.placeholder(int)
    unet.upcast_attention = False  # transformer attention in float32 under bfloat16
    unet.dtype = "bfloat16"  # compute dtype; params stay float32
    unet.remat = "none"  # "none" | "blocks" (rematerialise resnet/attention blocks)

    # --- Noise scheduler (MONAI schedulers' argument names). ---
    sched = config.scheduler = ml_collections.ConfigDict()
    sched.name = "ddpm"  # "ddpm" | "ddim" | "rflow" (rectified flow, MAISI)
    sched.num_train_timesteps = 1000  # T: training timesteps 0..T-1
    # Betas (ddpm/ddim): "linear_beta" | "scaled_linear_beta" | "sigmoid_beta" | "cosine".
    sched.schedule = "scaled_linear_beta"
    sched.beta_start = 0.0015  # first beta (the tutorial's; MONAI's default is 1e-4)
    sched.beta_end = 0.0195  # last beta (MONAI's default 2e-2)
    sched.sig_range = 6.0  # sigmoid_beta only: the sigmoid spans [-sig_range, sig_range]
    # What the UNet predicts (ddpm/ddim): "epsilon" | "v_prediction" | "sample".
    # rflow always predicts the velocity x0 - noise. v here: with this schedule
    # alphas_cumprod[T-1] = 1.4e-4, so an epsilon model's error reaches the predicted x0
    # x84 at the first sampling steps, and short trainings sample latents with 3-4x the
    # data's std (benchmarks/GENERATION.md, "Why v-prediction"); v passes its error through
    # at most x1.
    # configs/diffusion/monai_3d_ldm.py keeps the tutorial's "epsilon".
    sched.prediction_type = "v_prediction"
    # ddpm: "fixed_small" | "fixed_large" | "learned" | "learned_range"
    sched.variance_type = "fixed_small"
    # Clip the predicted x0 while sampling (ddpm/ddim). MONAI's default is True; off here
    # because latents are not confined to [-1, 1].
    sched.clip_sample = False
    sched.clip_sample_min = -1.0
    sched.clip_sample_max = 1.0
    # ddim: alpha_prod of the step before 0 is 1 (else alphas_cumprod[0])
    sched.set_alpha_to_one = True
    sched.steps_offset = 0  # ddim/rflow: added to every inference timestep
    # Rectified flow (MONAI RFlowScheduler names and defaults).
    sched.use_discrete_timesteps = True  # integer timesteps in training
    sched.sample_method = "uniform"  # training t: "uniform" | "logit-normal"
    sched.loc = 0.0  # logit-normal location
    sched.scale = 1.0  # logit-normal scale
    # Shift timesteps by the volume size at inference (resolution-dependent schedule).
    sched.use_timestep_transform = False
    sched.transform_scale = 1.0
    sched.base_img_size_numel = 32 * 32 * 32  # reference latent voxel count for the shift

    # --- Latents: the frozen stage-1 autoencoder and where its latents come from. ---
    lat = config.latents = ml_collections.ConfigDict()
    lat.autoencoder_workdir = "runs/balanced"  # a trained stage-1 workdir
    # The stage-1 config file that trains it (named in messages when it is missing).
    lat.autoencoder_config = ml_collections.config_dict.placeholder(str)
    # "best" | "latest" | a step; resolved to a number at start (saved in checkpoints).
    lat.autoencoder_step = ml_collections.FieldReference("best", field_type=object)
    # A folder written by `ldm-jax extract` (latents.json + NAME.npy); None:
    # encode the autoencoder's own training data on the fly inside the step.
    lat.dir = ml_collections.config_dict.placeholder(str)
    lat.val_fraction = 0.1  # latents.dir: the first 10% of the sorted files validate
    # On the fly: "sample" z = mu + sigma*eps (MONAI's tutorial; what the decoder saw in
    # training) or "mu".
    lat.encode = "sample"
    # 1/std of the training latents (all channels); None: computed at start over
    # scale_num_volumes volumes and stored in every checkpoint's config.
    lat.scale_factor = ml_collections.config_dict.placeholder(float)
    lat.scale_num_volumes = 16
    # (x, y, z, C) of one latent; filled in at start (the paired stage-1 config's plan).
    lat.latent_shape = ml_collections.FieldReference(None, field_type=object)

    # --- Conditioning with classifier-free guidance (latents.dir only). ---
    cond = config.conditioning = ml_collections.ConfigDict()
    cond.num_classes = 0  # K > 0: the UNet gets K+1 class embeddings (label K = no class)
    cond.labels_csv = ml_collections.config_dict.placeholder(str)  # columns name,label
    # Cross-attention context (with unet.with_conditioning, both or neither): a folder with
    # one NAME.npy per latent (NAME = its file name without suffix), float32
    # (S, unet.cross_attention_dim) or (cross_attention_dim,) as S = 1; one S for all.
    cond.context_dir = ml_collections.config_dict.placeholder(str)
    # Label -> "no class", context and aligned condition -> zeros (the null condition),
    # together, with this probability while training.
    cond.drop_prob = 0.1
    # Aligned condition computed from each training volume (ldm_jax.diffusion.aligned;
    # docs/conditioning.md): "" (none) | "projection" (2D image along an axis) | "coarse"
    # (a downsampled volume) | "inpainting" (the volume with a box blanked, and the box;
    # docs/editing.md). Sample with --condition FILE.
    cond.aligned = ""
    # "concat": lifted to the UNet's input grid and concatenated (MONAI's
    # DiffusionInferer mode="concat") | "pooled": a 2D CNN -> 8 numbers added to the time
    # embedding (the original project's design, kept for comparison; projections only).
    cond.aligned_mode = "concat"
    # Paired condition files instead (with extracted latents, latents.dir): a folder with
    # NAME.png / .tif / .npy / .nii.gz per latent NAME, each as `--condition` takes one.
    cond.aligned_dir = ml_collections.config_dict.placeholder(str)
    proj = cond.projection = ml_collections.ConfigDict()
    proj.axis = 2  # the projected axis (0, 1, 2 = X, Y, Z)
    proj.reduce = "sum"  # "sum" | "max" | "mean"
    # Depth-dependent point-spread, the depth cue: "none" | "defocus" | "astigmatic"
    # (3D SMLM's cylindrical lens); sigma0 psf_sigma, focal offset astigmatism and
    # depth_of_focus, all in voxels (ldm_jax.diffusion.aligned has the formulas).
    proj.psf = "none"
    proj.psf_sigma = 1.0
    # Depth of the focal plane, voxels from the volume's middle: 0 blurs a plane above it
    # as one below (the sign of a depth unread); beyond the volume every depth blurs apart.
    proj.focal_plane = 0.0
    proj.astigmatism = 4.0
    proj.depth_of_focus = 4.0
    proj.blur = 0.0  # depth-independent Gaussian blur after projecting (pixels)
    proj.normalize = True  # min-max to [0, 1] per image (also applied to --condition images)
    proj.noise = 0.0  # Gaussian read noise std after normalising (training only)
    coarse = cond.coarse = ml_collections.ConfigDict()
    coarse.factor = ml_collections.FieldReference(4, field_type=object)  # int or (fx, fy, fz)
    coarse.blur = 0.0  # Gaussian sigma in coarse voxels
    coarse.noise = 0.0  # Gaussian noise std, data intensity units (training only)
    inpainting = cond.inpainting = ml_collections.ConfigDict()
    inpainting.box_fraction = (0.25, 0.75)  # training boxes' side per axis, (min, max)

    # --- ControlNet (MONAI's ControlNet; docs/editing.md). Set unet_workdir to train one
    # on that stage-2 run's frozen UNet instead of a UNet: unet, scheduler, latents'
    # autoencoder and scale, and conditioning are then taken from that run. ---
    cn = config.controlnet = ml_collections.ConfigDict()
    cn.unet_workdir = ml_collections.config_dict.placeholder(str)  # a trained stage-2 workdir
    # "best" | "latest" | a step of that run (its EMA weights); resolved to a number.
    cn.unet_step = ml_collections.FieldReference("best", field_type=object)
    cn.conditioning_embedding_in_channels = 1  # the condition volume's channels
    # Conv widths of the condition embedding; k entries take a condition 2^(k-1) times the
    # latent's size per axis (MONAI's default: (16, 32, 96, 256), 8x).
    cn.conditioning_embedding_num_channels = (16, 32, 96, 256)
    cn.conditioning_scale = 1.0  # multiplies the residuals (MONAI's; 1 in training)
    # The condition of each training volume: "foreground_mask" (computed from the volume:
    # 1 where it is above `threshold`, on the fly only), "inpainting" (below, on the fly
    # only) or "files" (a folder `dir` with NAME.nii.gz / NAME.npy per latent in
    # latents.dir). Each is resampled to the condition grid (ldm_jax.diffusion.condition).
    cn.condition = ml_collections.ConfigDict()
    cn.condition.kind = "foreground_mask"
    cn.condition.threshold = 0.1  # data intensity units (after preprocessing)
    # "inpainting": the volume with one random box blanked, and the box (C + 1 channels);
    # each box side per axis is uniform in box_fraction of the axis.
    cn.condition.box_fraction = (0.25, 0.75)
    cn.condition.dir = ml_collections.config_dict.placeholder(str)

    # --- Loss. ---
    loss = config.loss = ml_collections.ConfigDict()
    loss.type = "mse"  # "mse" (MONAI's tutorial) | "l1", on the scheduler's target
    loss.min_snr_gamma = 0.0  # > 0: min-SNR-gamma weighting (Hang et al. 2023; 5 is usual)

    # --- Training and mesh: stage 1's sections (configs/default.py documents every
    # field), with the tutorial's optimiser and an EMA of the UNet. ---
    shared = stage1.get_config()
    train = config.train = shared.train
    train.num_steps = 20000
    train.batch_size = 2  # global batch
    train.learning_rate = 1e-4  # MONAI's 3D LDM tutorial (Adam 1e-4)
    train.disc_learning_rate = 0.0  # no discriminator in stage 2
    train.b1 = 0.9
    train.ema_decay = 0.999  # EMA of the UNet params (0: none); sampling uses the EMA
    # train.num_eval_batches: validation latents (on the fly: volumes); 0 = all.
    # train.remat overrides unet.remat.
    config.mesh = shared.mesh

    # --- Evaluation: fixed-timestep validation loss and a sample sheet. ---
    ev = config.eval = ml_collections.ConfigDict()
    ev.num_timesteps = 10  # validation loss at linspace(0, T-1, 10), fixed noise
    ev.num_samples = 2  # decoded samples drawn to images/step_<N>.png (0: none)
    ev.sampling_steps = 25  # DDIM steps for those samples (rflow: Euler steps)
    ev.seed = 0

    return config


def paired(config, stage1_config, workdir, config_file=None):
    """Points a stage-2 config at a stage-1 config (file `config_file`) and workdir: latent
    channels and shape."""
    from ldm_jax.autoencoder.geometry import latent_shape

    shape = latent_shape(stage1_config)
    config.latents.autoencoder_workdir = workdir
    config.latents.autoencoder_config = config_file
    config.latents.latent_shape = tuple(shape)
    config.unet.in_channels = config.unet.out_channels = int(shape[-1])
    return config
