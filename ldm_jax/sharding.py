"""Device mesh and shardings: batches split over "data" and, optionally, over "spatial".

The mesh has two axes, ("data", "spatial"). Params and optimiser states are replicated;
a batch `(B, X, Y, Z, C)` is split over "data" on B and over "spatial" on X, so a volume
too big for one device is cut into slabs along its first spatial axis. XLA's SPMD
partitioner inserts the halo exchanges the convolutions need.
"""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ldm_jax.errors import ConfigError

MESH_AXES = ("data", "spatial")


def mesh_shape(mesh_cfg, num_devices):
    """Resolves -1 entries of config.mesh against the device count."""
    data, spatial = int(mesh_cfg.data), int(mesh_cfg.spatial)
    if spatial == -1 and data == -1:
        raise ConfigError("mesh.data and mesh.spatial cannot both be -1; set one of them.")
    if spatial == -1:
        spatial = num_devices // max(data, 1)
    if data == -1:
        data = num_devices // max(spatial, 1)
    if data < 1 or spatial < 1 or data * spatial != num_devices:
        raise ConfigError(
            f"mesh data={mesh_cfg.data} x spatial={mesh_cfg.spatial} does not fit the "
            f"{num_devices} available devices: their product must equal the device count. "
            "Use -1 for one axis to fill the remaining devices."
        )
    return data, spatial


def make_mesh(mesh_cfg, devices=None):
    """Builds the ("data", "spatial") mesh with Auto axes (Flax linen needs them).

    With both axes given explicitly (no -1) and fewer devices asked for than exist, the
    mesh takes the first data*spatial devices: `mesh.data=1` means one device.
    """
    devices = jax.devices() if devices is None else list(devices)
    data, spatial = int(mesh_cfg.data), int(mesh_cfg.spatial)
    if data > 0 and spatial > 0 and data * spatial < len(devices):
        if jax.process_count() > 1:
            raise ConfigError(
                f"mesh data={data} x spatial={spatial} uses {data * spatial} of the "
                f"{len(devices)} devices of {jax.process_count()} processes; with several "
                "processes the mesh must use them all. Set --config.mesh.data=-1.")
        devices = devices[: data * spatial]
    shape = mesh_shape(mesh_cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_spec(mesh, ndim: int = 5):
    """PartitionSpec of a batch entry on this mesh: volumes (B, X, Y, Z, C) split over
    "data" and X over "spatial"; anything else (class labels (B,), contexts (B, S, D))
    over "data" only."""
    if mesh.shape["spatial"] > 1 and ndim == 5:
        return P("data", "spatial")
    return P("data")


def batch_sharding(mesh, ndim: int = 5):
    return NamedSharding(mesh, batch_spec(mesh, ndim))


def replicated(mesh):
    return NamedSharding(mesh, P())


def check_batch_fits(mesh, global_batch, volume_size):
    """Fails early, with a fix, when the batch or volume cannot be split over the mesh."""
    data, spatial = mesh.shape["data"], mesh.shape["spatial"]
    if global_batch % data:
        raise ConfigError(
            f"train.batch_size={global_batch} is not divisible by the {data} devices on the "
            f"'data' mesh axis. Use a multiple of {data} or set --config.mesh.data.")
    if volume_size[0] % spatial:
        raise ConfigError(
            f"data.volume_size[0]={volume_size[0]} (X) is not divisible by mesh.spatial="
            f"{spatial}. Use an X size that is a multiple of {spatial}.")


def put_global_batch(array, mesh):
    """Places a host-local batch entry on the mesh as one global array (multi-host
    aware), split as `batch_spec`: with several processes each one's rows, in process
    order, make up the global batch."""
    sharding = batch_sharding(mesh, np.ndim(array))
    if jax.process_count() == 1:
        return jax.device_put(array, sharding)
    return jax.make_array_from_process_local_data(sharding, array)


def put_whole(array, sharding):
    """`array`, which every process holds whole, as a global array with `sharding`."""
    if jax.process_count() == 1:
        return jax.device_put(array, sharding)
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def put_shared_batch(array, mesh):
    """Places a batch that every process holds whole (evaluation batches are the same
    everywhere) as one global array split over the mesh like a training batch."""
    return put_whole(array, batch_sharding(mesh, np.ndim(array)))


def put_replicated(tree, mesh):
    """Host (or single-device) arrays that every process holds alike, replicated on the
    mesh: what a jitted step over a multi-process mesh takes."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: put_whole(x, sharding), tree)


def to_host(array) -> np.ndarray:
    """A jax array as one numpy array on this process, gathered from every process when
    it is split over several (then every process must call this, in the same order)."""
    if array.is_fully_addressable or array.is_fully_replicated:
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
