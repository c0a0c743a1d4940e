"""The ``compute`` params the library tests pass: the local process pool (params.yaml's value)."""

from bonemet.config import ComputeSpec

LOCAL_COMPUTE = ComputeSpec(scheduler="local", dask_address=None, dask_connect_timeout_s=30)
