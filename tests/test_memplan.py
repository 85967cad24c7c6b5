"""Plan by numbers: ``train.py --dry-run`` at Qwen2.5-7B / 0.5B shapes on 16 simulated devices (no weights: the
model directories hold only config.json and a tokenizer) reports per-device parameter, optimizer, frozen-model and
KV-cache memory that match a hand calculation within 10%, for the RAM stage with P_M's proposal sampler and for the
TrRa stage."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(__file__))

QWEN7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
          "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
          "vocab_size": 152064, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
          "max_position_embeddings": 32768, "hidden_act": "silu", "torch_dtype": "bfloat16"}
# Qwen2.5-0.5B with P_M's 152064 embedding rows (RAM needs one vocabulary; the real one has 151936)
QWEN05B = dict(QWEN7B, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
               num_key_value_heads=2, tie_word_embeddings=True)
DEVICES = 16


def n_params(c: dict) -> int:
    """Parameter count of a Qwen2 decoder by hand: embeddings (+ untied head), per layer q/k/v/o with q/k/v biases,
    SwiGLU MLP, two norms; final norm."""
    D, F, L, H, K, V = (c[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads", "num_key_value_heads", "vocab_size"))
    Dh = D // H
    attn = D * H * Dh + 2 * D * K * Dh + H * Dh * D + H * Dh + 2 * K * Dh
    per_layer = attn + 3 * D * F + 2 * D
    return V * D * (1 if c["tie_word_embeddings"] else 2) + L * per_layer + D


def _model_dir(path, config, tok_dir):
    import shutil

    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    for name in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, name), path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from tokenizer_fixtures import make_hf_tokenizer

    root = tmp_path_factory.mktemp("pod")
    make_hf_tokenizer(root / "tok", "qwen")
    _model_dir(root / "p7b", QWEN7B, root / "tok")
    _model_dir(root / "q05b", QWEN05B, root / "tok")
    with open(root / "ram.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": f"question {i}", "response": "short answer",
                                "proposal": "a long and wordy answer"}) + "\n" for i in range(32))
    return root


def _dry_run(dirs, *overrides):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), os.path.join(ROOT, "configs", "pod_qwen7b_ram.yaml"),
           "--dry-run", f"run_dir={dirs}/run", f"model.init={dirs}/q05b", f"proposal={dirs}/p7b",
           f"data.train_files=[{dirs}/ram.jsonl]", "model.attention_impl=chunked", "data.batch_size=16",
           "optimizer.grad_accum=1", "data.packing=false",
           *overrides]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("PLAN_JSON "))
    assert "per-device memory on mesh" in out.stdout
    return json.loads(line[len("PLAN_JSON "):]), out.stdout


def _close(got, want, what):
    assert abs(got - want) <= 0.10 * want, f"{what}: reported {got / 2**20:.1f} MiB, hand {want / 2**20:.1f} MiB"


def test_ram_stage_and_proposal_sampler_at_7b_shapes(dirs):
    plan, stdout = _dry_run(dirs)
    n_q, n_p = n_params(QWEN05B), n_params(QWEN7B)
    assert f"parameters: {n_q:,}" in stdout  # the model built from config.json is the hand-counted one
    tr = plan["train"]
    # fsdp=16: every matrix is split 16 ways; float32 master weights, Adam's two moments
    _close(tr["params"], 4 * n_q / DEVICES, "aligner parameters")
    _close(tr["optimizer"], 2 * 4 * n_q / DEVICES, "Adam state")
    # the compiled step's arguments are the train state plus the batch (16 rows x 4096 tokens, 10 int32/f32 arrays)
    _close(tr["compiled"]["argument"], 12 * n_q / DEVICES + 10 * 4 * 16 * 4096 / DEVICES, "step arguments")
    s = plan["samplers"]["proposal"]
    B, S = 16, 4096  # data.batch_size prompts, data.max_len tokens; one row per device
    _close(s["params"], 2 * n_p / DEVICES, "P_M parameters (bf16)")
    kv = 2 * QWEN7B["num_hidden_layers"] * B * S * QWEN7B["num_key_value_heads"] * 128 * 2  # k and v, bf16
    _close(s["kv_cache"], kv / DEVICES, "P_M KV cache")
    _close(s["compiled_prefill"]["argument"], (2 * n_p + kv) / DEVICES, "prefill arguments")


@pytest.mark.slow  # ~17 s of CPU; the RAM one above stays in the default suite
def test_trra_stage_at_7b_shapes(dirs):
    """TrRa: the 0.5B student trains against two frozen 7B-shaped teachers (float32 here, sharded 16 ways)."""
    plan, _ = _dry_run(dirs, "stage=trra", f"trra.reference={dirs}/p7b", f"trra.aligned={dirs}/p7b", "proposal=null",
                       "data.packing=false", "data.batch_size=16", "data.max_len=1024", "data.max_prompt_len=512")
    n_q, n_p = n_params(QWEN05B), n_params(QWEN7B)
    _close(plan["train"]["frozen"], 2 * 4 * n_p / DEVICES, "two frozen teachers")
    _close(plan["train"]["params"], 4 * n_q / DEVICES, "student parameters")
    assert not plan["samplers"]
