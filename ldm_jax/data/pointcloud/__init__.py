"""Point clouds (SMLM localisations, nm) in and out of the volume world.

  read      io       CSV / .npy / .npz / HDF5 -> (N, 3) nm
  voxelise  grid     (N, 3) nm -> (X, Y, Z) + 4x4 affine (nm)
  configure spec     `CloudSpec`: reading and voxelising as config.data says
  sample    sample   (X, Y, Z) + affine -> (N, 3) nm
  files     volumes  NIfTI in micrometres, model inputs from clouds, round-trip scores
Scores (Chamfer, EMD) are in `ldm_jax.metrics.pointcloud`; built-in SMLM-like clouds in
`ldm_jax.data.synthetic.smlm`; the training source in `ldm_jax.data.sources.pointcloud`.
"""
