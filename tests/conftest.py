"""Test setup: simulate 8 CPU devices so sharding tests run without accelerators.

XLA reads the flag once, when the backend starts, so it must be set before JAX is imported.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags = (_flags + " --xla_force_host_platform_device_count=8").strip()
# The test models are tiny, so compiling (LLVM's optimisation passes) costs far more than running: unoptimised
# machine code cut the CPU time of test_sampler.py by 30% and of test_train.py by 21%, no test slower. Results
# differ from the default build in the last float bits only; bit-identical comparisons (resume) run both sides in
# this process, under the same flags.
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags

import contextlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test, excluded from the fast suite")


@contextlib.contextmanager
def _persistent_compile_cache(directory):
    """JAX's persistent compilation cache in ``directory`` (every compile cached), restored afterwards: tests that
    compile the same step several times (straight, interrupted and resumed runs; rounds) turn repeats into hits."""
    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", old[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


@pytest.fixture(scope="module", autouse=True)
def _fresh_compile_caches():
    """Every test module starts and ends with JAX's in-memory compile caches cleared: one full-suite process
    otherwise holds every executable of every module (thousands), and a full run died in an XLA compile late in
    the suite while the same module passed alone."""
    jax.clear_caches()
    yield
    jax.clear_caches()


@pytest.fixture(scope="module")
def module_compile_cache(tmp_path_factory):
    """A persistent compilation cache for a whole test module (``pytestmark = usefixtures(...)``)."""
    with _persistent_compile_cache(tmp_path_factory.mktemp("jax_cache")):
        yield


@pytest.fixture()
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for one test."""
    with _persistent_compile_cache(tmp_path_factory.mktemp("jax_cache")):
        yield
