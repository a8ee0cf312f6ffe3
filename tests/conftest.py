"""Test-wide setup: 8 simulated CPU devices, and one compilation cache for the session."""
import os
import tempfile

# Must happen before jax initialises its backends.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests train the same tiny configs (in this process and in subprocesses, which inherit
# the environment): a persistent cache compiles each program once per session. CPU programs
# compile in well under the default 1 s threshold, hence the zero thresholds.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="lmjax-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
