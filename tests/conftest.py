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

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# JAX's persistent compilation cache for the whole session, every program cached however fast it compiled: the
# tests build the same tiny models' programs again and again in fresh jit closures (each test's sampler, train
# step, eval) and the in-memory caches are cleared between modules (below), so a repeat costs a disk read instead
# of an XLA compile. The key is the program text, compile options and devices, so a hit runs the same machine code
# a fresh compile would. A fresh directory per process, removed at exit: nothing carries over between runs.
_CACHE_DIR = tempfile.mkdtemp(prefix="ramjax-test-jax-cache-")
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test, excluded from the fast suite")


# Two workers unless told otherwise (`-n N`; `-n 0` or `-p no:xdist` for one process): most of the suite's time is
# XLA compiles and Python, one core each, so a 2-core machine runs two test files at once. Whole files go to one
# worker (--dist loadfile) so a module's expensive fixtures (trained runs, models) are built once. Without
# pytest-xdist installed (requirements-test.txt pins it) the suite runs in one process as before.
WORKERS = 2
# The costliest files (CI logs' --durations), dealt out first so that neither worker is left running a long
# file alone at the end; the others follow in their usual order. (xdist's own order, most tests first, would deal
# the few-test, long-running end-to-end files last.)
COSTLY_FIRST = ("test_user_data.py", "test_pipeline.py", "test_speculative.py", "test_multihost.py",
                "test_sampler.py", "test_realign.py", "test_evaluate.py", "test_train.py", "test_faults.py")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    if (not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput")
            or config.getoption("numprocesses", None) is not None or config.getoption("collectonly")
            or config.getoption("usepdb")):
        return
    config.option.numprocesses = WORKERS
    if config.getoption("dist") == "no":
        config.option.dist = "loadfile"
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    if "PYTEST_XDIST_WORKER" in os.environ:  # every worker sorts alike: xdist deals the files in this order
        rank = {name: i for i, name in enumerate(COSTLY_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="module", autouse=True)
def _fresh_compile_caches():
    """Every test module starts and ends with JAX's in-memory compile caches cleared: one full-suite process
    otherwise holds every executable of every module (thousands), and a full run died in an XLA compile late in
    the suite while the same module passed alone."""
    jax.clear_caches()
    yield
    jax.clear_caches()
