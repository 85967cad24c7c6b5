"""When ramjax starts jax.distributed, and with which arguments (environment → arguments; no runtime is started).
The runtime itself is exercised by the two-process tests in test_multihost.py."""
import pytest

from ramjax import distributed
from ramjax.config import DistributedConfig


def args(env, **cfg):
    cfg.setdefault("enabled", None)  # auto, the default
    return distributed.initialize_args(DistributedConfig(**cfg), env)


def test_single_process_environments_start_nothing():
    assert args({}) is None
    assert args({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None  # a one-task SLURM job
    assert args({"OMPI_COMM_WORLD_SIZE": "1"}) is None
    assert args({"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # a single-host TPU VM
    # enabled=false wins over every hint
    assert args({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "1"},
                enabled=False) is None


def test_cluster_managers_are_left_to_jax_detection():
    for env, reason in (({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, "SLURM"),
                        ({"OMPI_COMM_WORLD_SIZE": "8"}, "Open MPI"),
                        ({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1,t1k-w-2,t1k-w-3"}, "TPU slice with 4"),
                        ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, "multi-slice")):
        kw = args(env)
        assert reason in kw.pop("reason")
        assert kw == {"coordinator_address": None, "num_processes": None, "process_id": None}


def test_environment_variables_and_explicit_settings():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    kw = args(env)
    assert kw.pop("reason") == "JAX_COORDINATOR_ADDRESS is set"
    assert kw == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    # the config wins over the environment, key by key
    kw = args(env, coordinator_address="h0:99", process_id=0)
    assert kw["coordinator_address"] == "h0:99" and kw["num_processes"] == 4 and kw["process_id"] == 0
    # explicit settings alone start it (enabled: null = auto)
    assert args({}, coordinator_address="h0:99", num_processes=2, process_id=1)["num_processes"] == 2
    # enabled=true with nothing given: JAX's own detection (e.g. a TPU VM whose metadata server knows)
    kw = args({}, enabled=True)
    assert kw.pop("reason") == "distributed.enabled=true" and set(kw.values()) == {None}


def test_half_given_settings_are_named_errors():
    with pytest.raises(distributed.DistributedError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
        args({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    with pytest.raises(distributed.DistributedError, match="distributed.num_processes"):
        args({}, coordinator_address="h0:99")
    with pytest.raises(distributed.DistributedError, match="JAX_PROCESS_ID"):
        args({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "one"})
    # under SLURM the coordinator alone is fine: JAX reads the task count and rank from SLURM
    assert args({"JAX_COORDINATOR_ADDRESS": "h:1", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}) is not None


def test_single_process_collectives_are_the_identity():
    assert distributed.any_process(True) is True and distributed.any_process(False) is False
    assert distributed.broadcast_int(7) == 7
    assert distributed.allgather_objects({"a": [1]}) == [{"a": [1]}]
    assert distributed.local_share(list(range(10)), 4, 3) == (4, [4, 5, 6])


def test_train_cli_names_half_given_settings(tmp_path):
    """train.py exits 2 with the named error before touching a device (JAX_COORDINATOR_ADDRESS without the rest)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root, JAX_COORDINATOR_ADDRESS="127.0.0.1:1")
    for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, os.path.join(root, "train.py"), "stage=sft", f"run_dir={tmp_path}/r",
                          f"tokenizer={tmp_path}/none"], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "DistributedError" in out.stderr and "JAX_NUM_PROCESSES" in out.stderr
