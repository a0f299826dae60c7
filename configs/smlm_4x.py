"""The main job's model and recipe (balanced_4x) for SMLM localisations voxelised on the fly.

Two data settings make sparse localisation volumes learnable (benchmarks/QUALITY.md,
"SMLM"): each localisation spread with a gaussian of one voxel (20 nm here; at half a
voxel the volume is shot noise that even the best linear 4x code keeps only in part), and
an L1 loss weighted 10x on the foreground (plain L1 settles on a blank volume, the median
of data that is 93% background). `data.a_max = 1` localisation per voxel is near the
densest voxels of the built-in clouds at this rendering (`ldm-jax voxelize` prints the
maxima of your own). Set data.source = "pointcloud" and data.train_dir for your files.
"""

from configs import balanced_4x


def get_config():
    config = balanced_4x.get_config()
    config.data.source = "synthetic_smlm"
    config.data.pointcloud_voxel_size = 20.0
    config.data.pointcloud_sigma = 20.0
    config.data.a_max = 1.0
    config.loss.recon = "weighted"
    return config
