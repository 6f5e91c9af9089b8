"""CuPy backend: NumPy's API on an NVIDIA GPU. Differs from the NumPy backend only in the imports
and in moving arrays between host and device."""

from arraygpt.xp import BackendUnavailable

try:
    import cupy
except ImportError as e:
    raise BackendUnavailable("the cupy backend needs CuPy, which is not installed: pip install 'arraygpt[cupy]'") from e
try:
    _n_devices = cupy.cuda.runtime.getDeviceCount()
except Exception as e:  # CUDARuntimeError when the driver is missing
    raise BackendUnavailable(f"the cupy backend needs a CUDA device, and none is usable: {e}") from e
if _n_devices == 0:
    raise BackendUnavailable("the cupy backend needs a CUDA device, and there is none")

import array_api_compat.cupy as xp  # noqa: F401  (the Backend field)

name = "cupy"
array_type = cupy.ndarray
device = cupy.cuda.Device()


def asarray(host_array):
    return cupy.asarray(host_array)


def to_numpy(x):
    return cupy.asnumpy(x)


def scatter_add(target, indices, values):
    if hasattr(cupy.add, "at"):  # newer CuPy
        cupy.add.at(target, indices, values)
    else:
        import cupyx

        cupyx.scatter_add(target, indices, values)


def device_uniform(seed, shape, dtype):
    # Philox: counter-based, so a generator per call is cheap to seed (XORWOW's set-up is not).
    generator = cupy.random.RandomState(seed, method=cupy.cuda.curand.CURAND_RNG_PSEUDO_PHILOX4_32_10)
    return generator.random_sample(shape, dtype=dtype)


def synchronize():
    cupy.cuda.get_current_stream().synchronize()
