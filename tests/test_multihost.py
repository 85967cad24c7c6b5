"""Two processes on 127.0.0.1 (gloo CPU collectives, 2 simulated devices each) train exactly like one process."""
import os
import socket
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from test_train import ROOT, _assert_trees_close, _cfg, _losses, fx, make_fixture, ram_overrides  # noqa: E402,F401

from ramjax import checkpoint as ckpt_lib  # noqa: E402
from ramjax import train_lib  # noqa: E402

_WORKER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from ramjax import config, train_lib
cfg = config.load_config(config.TrainConfig, None, {overrides!r})
kill_at = {kill_at!r}

def progress(event):  # a real SIGTERM, delivered to process 1 only, after step kill_at
    if kill_at is not None and event["step"] == kill_at and jax.process_index() == 1:
        os.kill(os.getpid(), signal.SIGTERM)

r = train_lib.train(cfg, progress=progress)  # (jax.distributed starts inside: touch no device before)
print("DONE", jax.process_index(), jax.process_count(), jax.device_count(), r.step, r.interrupted, flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_all(procs, timeout: float) -> list[str]:
    """The output of every process, after each exited 0 (the others are killed if one fails or hangs)."""
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
    return outs


def _train_two(fx, multi_dir, kill_at, cache_dir=None):
    """Trains in two processes; ``cache_dir``: a persistent compilation cache they share (process 0 writes it),
    so a second launch (the resume) loads the programs the first compiled instead of compiling them again."""
    port = _free_port()
    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    if cache_dir is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    procs = []
    for i in range(2):
        over = ram_overrides(fx, multi_dir, *mesh, "checkpoint.every=100",  # distributed.enabled: null = auto
                             f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
                             f"distributed.process_id={i}")
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER.format(root=ROOT, overrides=over,
                                                                           kill_at=kill_at)],
                                      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return _wait_all(procs, 600)


def test_two_processes_match_one_through_a_sigterm_on_one_host(fx, tmp_path):
    """Two processes (2 devices each); process 1 alone gets SIGTERM after step 3: both stop after step 3, save
    that one checkpoint and return; rerun, they resume and finish; the losses and final parameters are those of one
    uninterrupted process. (Without the agreement, process 0 would run step 4 while process 1 waits in its save:
    the test would hang until its timeout.)"""
    multi_dir = str(tmp_path / "multi")
    cache = tmp_path / "jax_cache"
    outs = _train_two(fx, multi_dir, kill_at=3, cache_dir=cache)
    for i, out in enumerate(outs):
        assert f"DONE {i} 2 4 3 True" in out, out[-2000:]
    assert ckpt_lib.CheckpointManager(os.path.join(multi_dir, "checkpoints")).all_steps() == [3]
    outs = _train_two(fx, multi_dir, kill_at=None, cache_dir=cache)
    for i, out in enumerate(outs):
        assert f"DONE {i} 2 4 6 False" in out, out[-2000:]

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


_SAMPLE_WORKER = """
import sys
sys.path.insert(0, {root!r})
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
import sample
rc = sample.main({args!r})
print("RC", rc, jax.process_index(), jax.process_count(), flush=True)
sys.exit(rc)
"""


def _run_workers(argvs, env, timeout=600, envs=None):
    procs = [subprocess.Popen([sys.executable, "-c", _SAMPLE_WORKER.format(root=ROOT, args=a)],
                              env=dict(env, **(envs[i] if envs else {})), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i, a in enumerate(argvs)]
    return _wait_all(procs, timeout)


def test_sample_py_two_processes_write_the_one_process_file(tmp_path):
    """sample.py on two gloo processes (2 devices each) writes byte for byte the file of one process (2 devices):
    5 prompts × 2 samples in batches of 2, so the second round leaves process 1 without prompts; and it resumes a
    file cut inside a prompt's group of samples."""
    import json

    import jax
    from hf_fixtures import random_params
    from tokenizer_fixtures import make_hf_tokenizer

    from ramjax.model import ModelConfig
    from ramjax.tokenizer import load_tokenizer

    tok_dir = tmp_path / "tok"
    make_hf_tokenizer(tok_dir, "llama")
    tok = load_tokenizer(tok_dir)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, eos_token_id=tok.eos_id)
    ckpt_lib.save_model_dir(tmp_path / "model", cfg, jax.tree_util.tree_map(np.asarray, random_params(cfg, 5)),
                            tokenizer=str(tok_dir))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (
        "the quick brown fox", "hello world", "lazy dog", "a b c", "model proposal")))
    common = [f"proposal={tmp_path}/model", f"prompts_file={prompts}", "mode=proposal", "num_samples=2",
              "batch_size=2", "max_new_tokens=6", "proposal_temperature=1.0", "proposal_top_p=1.0", "seed=3",
              "repetition_penalty=1.0", "kl_threshold=null"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    one = tmp_path / "one.jsonl"
    _run_workers([common + [f"output_file={one}"]], env)
    want = one.read_text()
    assert len(want.splitlines()) == 10

    multi = tmp_path / "multi.jsonl"
    multi.write_text("".join(want.splitlines(keepends=True)[:3]))  # prompt 0 and half of prompt 1's samples
    port = _free_port()
    # launched as on a cluster: the environment says how many processes there are and which one each is
    outs = _run_workers([common + [f"output_file={multi}"] for i in range(2)], env,
                        envs=[{"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                               "JAX_PROCESS_ID": str(i)} for i in range(2)])
    assert "RC 0 0 2" in outs[0] and "RC 0 1 2" in outs[1]
    assert multi.read_text() == want
    # Not trivially equal: the draws are random (a prompt's two samples differ), so a wrong key or order shows.
    rows = [json.loads(x) for x in want.splitlines()]
    assert [r["index"] for r in rows] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert rows[0]["token_ids"] != rows[1]["token_ids"]
