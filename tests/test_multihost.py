"""Two processes on 127.0.0.1 (gloo CPU collectives, 2 simulated devices each) train exactly like one process."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_train import ROOT, _assert_trees_close, _cfg, _losses, fx, make_fixture, ram_overrides  # noqa: E402,F401

from ramjax import checkpoint as ckpt_lib  # noqa: E402
from ramjax import train_lib  # noqa: E402

_WORKER = """
import sys
sys.path.insert(0, {root!r})
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from ramjax import config, train_lib
cfg = config.load_config(config.TrainConfig, None, {overrides!r})
r = train_lib.train(cfg)
print("DONE", jax.process_index(), jax.process_count(), jax.device_count(), r.step, flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(fx, tmp_path):
    port = _free_port()
    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1"]
    multi_dir = str(tmp_path / "multi")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = []
    for i in range(2):
        over = ram_overrides(fx, multi_dir, *mesh, "distributed.enabled=true",
                             f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
                             f"distributed.process_id={i}")
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER.format(root=ROOT, overrides=over)], env=env,
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
        assert f"DONE {i} 2 4 6" in out, out[-2000:]

    # The reference: one process (this one, 8 simulated devices) with the same data, batch and objective. The
    # global batch is split over devices differently, so sums differ in the last float32 bits only.
    one_dir = str(tmp_path / "one")
    train_lib.train(_cfg(ram_overrides(fx, one_dir, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")))
    got, want = _losses(multi_dir), _losses(one_dir)
    assert [s for s, _, _ in got] == [s for s, _, _ in want] == list(range(1, 7))
    np.testing.assert_allclose([l for _, l, _ in got], [l for _, l, _ in want], rtol=1e-5)
    _, p_multi = ckpt_lib.load_model_dir(os.path.join(multi_dir, "model"))
    _, p_one = ckpt_lib.load_model_dir(os.path.join(one_dir, "model"))
    _assert_trees_close(p_multi, p_one, 1e-5)
