"""The phantom: synthetic hip anatomy with ARCO stage features, rendered to MR and CT (docs/phantom.md).

Modules: ``tissues`` (MR/CT properties, protocols), ``shapes`` (signed-distance primitives),
``anatomy`` (patients, hips, lesions), ``hip_shapes`` and ``layers`` (what is painted where),
``render`` (voxel grids, MR and CT acquisitions).
"""
