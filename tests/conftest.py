import os

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
