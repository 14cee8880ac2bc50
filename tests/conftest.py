import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Gradient checks are slow per example and their timing varies: no deadline, modest example counts.
settings.register_profile("default", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", deadline=None, max_examples=200,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# npmask.train trains its domains one after the other in the tests (the default on a multi-core
# NumPy machine is one process per domain): many tests replace a function in this process to
# simulate a kill or a full disk, which a worker process would not see. The worker path has its
# own tests (tests/test_domain_workers.py), which pass --workers.
os.environ.setdefault("NPMASK_TRAIN_WORKERS", "1")


@pytest.fixture
def host_backed_cupy():
    """A function turning a NumPy array into a real ``cupy.ndarray`` that needs no GPU: its device
    pointer is never touched and ``get()`` returns the host values. Enough for host-side logic that
    must tell CuPy arrays apart (CuPy refuses ``np.asarray`` of them); nothing may launch a kernel."""
    cupy = pytest.importorskip("cupy")
    from npmask import backend

    backend._import_cupy()                     # get_array_module recognises cupy arrays from now on

    class HostBacked(cupy.ndarray):
        def get(self, *args, **kwargs):
            return self.host

    def on_device(a):
        a = np.ascontiguousarray(a)
        mem = cupy.cuda.UnownedMemory(0, max(a.nbytes, 1), None, device_id=0)
        out = HostBacked(a.shape, a.dtype, cupy.cuda.MemoryPointer(mem, 0))
        out.host = a
        return out
    return on_device
