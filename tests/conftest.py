"""Test-wide setup: 8 simulated CPU devices, so sharded code paths run on any machine."""
import os

# Must happen before jax initialises its backends.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
