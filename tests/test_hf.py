"""Hugging Face checkpoints both ways: parity with transformers (torch CPU, float32, eager attention), sharded
safetensors, export round trips, sharded placement, and the named errors."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hf_fixtures import PARITY_SPECS, HFSpec, hf_logits, load_hf_reference, make_hf_model, random_params, random_tokens
from safetensors.numpy import load_file, save_file

from ramjax import hf
from ramjax import model as model_lib
from ramjax import sharding as shd
from ramjax.model import ModelConfig, RopeScaling


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def assert_logits_match(ref, ours, atol=1e-4, kl_tol=1e-6):
    """max |Δlogit| < atol and the mean over positions of KL(p_ref ‖ p_ours) < kl_tol."""
    ref, ours = np.asarray(ref), np.asarray(ours)
    assert ref.shape == ours.shape
    lp, lq = _log_softmax(ref), _log_softmax(ours)
    kl = (np.exp(lp) * (lp - lq)).sum(-1).mean()
    diff = np.abs(ref - ours).max()
    assert diff < atol and kl < kl_tol, f"max |Δlogit| = {diff:.3g}, mean KL = {kl:.3g}"


_forward = jax.jit(model_lib.forward, static_argnums=0)  # eager Flax apply compiles op by op: far slower


def _ours(cfg, params, tokens):
    return np.asarray(_forward(cfg, params, jnp.asarray(tokens))[0])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``name -> (directory, torch model)`` for every parity spec, built once per module."""
    out = {}
    for name, spec in PARITY_SPECS.items():
        d = tmp_path_factory.mktemp(name)
        out[name] = (str(d), make_hf_model(d, spec))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("name", list(PARITY_SPECS))
def test_parity_with_transformers(built, name):
    path, ref = built[name]
    cfg, params = hf.load_hf(path)
    spec = PARITY_SPECS[name]
    assert cfg.vocab_size == spec.vocab_size and cfg.num_layers == spec.num_layers
    assert cfg.head_dim == (spec.head_dim or spec.hidden_size // spec.num_heads)
    assert cfg.tie_word_embeddings == spec.tied and ("lm_head" in params) == (not spec.tied)
    assert cfg.qkv_bias == (spec.bias or spec.arch == "qwen2")
    tokens = random_tokens(1, 3, 24, cfg.vocab_size)  # 24 > original_max_position_embeddings of LLAMA3_ROPE
    ref_logits = hf_logits(ref, tokens)
    assert np.abs(ref_logits).max() > 1.0  # the weights are not near-zero: the comparison is not vacuous
    assert_logits_match(ref_logits, _ours(cfg, params, tokens))


def test_parity_detects_a_wrong_layout(built):
    """The parity check has teeth: swapping q/k heads (a classic conversion bug) breaks it."""
    path, ref = built["llama_odd_head_dim"]
    cfg, params = hf.load_hf(path)
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad["layers"]["wq"] = params["layers"]["wq"][..., ::-1]  # reversed within each head: a permuted rope layout
    tokens = random_tokens(2, 1, 12, cfg.vocab_size)
    with pytest.raises(AssertionError):
        assert_logits_match(hf_logits(ref, tokens), _ours(cfg, bad, tokens))


def test_config_fields_from_hf(built):
    cfg = hf.config_from_hf(hf.read_hf_config(built["llama3_rope_scaling"][0]))
    assert cfg.architecture == "llama" and cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 16)
    q = hf.config_from_hf(hf.read_hf_config(built["qwen2_bias_tied"][0]))
    assert (q.architecture, q.qkv_bias, q.o_bias, q.mlp_bias, q.num_kv_heads, q.rope_theta) == (
        "qwen2", True, False, False, 1, 1e6)
    b = hf.config_from_hf(hf.read_hf_config(built["llama_tied_bias"][0]))
    assert (b.qkv_bias, b.o_bias, b.mlp_bias, b.tie_word_embeddings) == (True, True, True, True)


def test_v4_style_config_equals_v5(built, tmp_path):
    """transformers v4 wrote ``rope_theta`` + ``rope_scaling`` (with ``type``) and ``torch_dtype``; v5 writes
    ``rope_parameters`` and ``dtype``. Both give one ModelConfig, and the v4 file still matches transformers."""
    src, ref = built["llama3_rope_scaling"]
    v5 = hf.read_hf_config(src)
    v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "dtype")}
    rp = dict(v5["rope_parameters"])
    v4["rope_theta"] = rp.pop("rope_theta")
    rp["type"] = rp.pop("rope_type")
    v4.update(rope_scaling=rp, torch_dtype="float32", eos_token_id=[2, 7])
    assert hf.config_from_hf(v4) == hf.config_from_hf(v5).replace(eos_token_id=(2, 7))
    d = tmp_path / "v4"
    shutil.copytree(src, d)
    (d / "config.json").write_text(json.dumps(v4))
    cfg, params = hf.load_hf(d)
    assert cfg.eos_token_id == (2, 7)
    tokens = random_tokens(3, 2, 20, cfg.vocab_size)
    assert_logits_match(hf_logits(ref, tokens), _ours(cfg, params, tokens))
    # v4 defaults: no rope_scaling and no head_dim -> default rope, hidden // heads
    plain = {k: v for k, v in v4.items() if k not in ("rope_scaling", "head_dim")}
    p = hf.config_from_hf(plain)
    assert p.rope_scaling is None and p.head_dim == 8 and p.param_dtype == "float32"


def test_sharded_safetensors_index(tmp_path):
    ref = make_hf_model(tmp_path, HFSpec(arch="qwen2", seed=7), max_shard_size="20KB")
    assert (tmp_path / hf.SAFETENSORS_INDEX).exists() and not (tmp_path / hf.SAFETENSORS_FILE).exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    cfg, params = hf.load_hf(tmp_path)
    tokens = random_tokens(4, 2, 16, cfg.vocab_size)
    assert_logits_match(hf_logits(ref, tokens), _ours(cfg, params, tokens))


def test_padded_embedding_rows_and_tokenizer(tmp_path):
    """Embedding rows beyond the tokenizer (Qwen2.5-style) load; vocab_size is the row count and
    ``ramjax.load_model`` excludes the padded rows from its logits."""
    import ramjax

    ref = make_hf_model(tmp_path, HFSpec(arch="qwen2", tokenizer="qwen", extra_vocab_rows=37, hidden_size=32))
    model = ramjax.load_model(tmp_path)
    n_tok = model.tokenizer.vocab_size
    assert model.config.vocab_size == n_tok + 37 and model.vocab_limit == n_tok
    tokens = random_tokens(5, 2, 10, n_tok)
    assert_logits_match(hf_logits(ref, tokens), _ours(model.config, model.params, tokens))


def test_config_vocab_smaller_than_embedding_rows(built, tmp_path):
    """config.json's vocab_size below the embedding rows: the rows win (with a warning)."""
    src, ref = built["llama_gqa1_untied"]
    shutil.copytree(src, tmp_path / "m")
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    conf["vocab_size"] = 100
    (tmp_path / "m" / "config.json").write_text(json.dumps(conf))
    cfg, params = hf.load_hf(tmp_path / "m")
    assert cfg.vocab_size == 128 and params["embed"].shape == (128, 32)


# ----------------------------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("name,shard_bytes", [("llama3_rope_scaling", 30_000), ("qwen2_bias_tied", 2**30),
                                               ("llama_tied_bias", 2**30), ("llama_odd_head_dim", 2**30)])
def test_export_round_trip(built, tmp_path, name, shard_bytes):
    """import -> save_hf -> transformers.from_pretrained gives the original logits; re-import is exact."""
    src, ref = built[name]
    cfg, params = hf.load_hf(src)
    out = tmp_path / "export"
    hf.save_hf(out, cfg, params, max_shard_bytes=shard_bytes)
    sharded = (out / hf.SAFETENSORS_INDEX).exists()
    assert sharded == (shard_bytes < 2**30)
    if sharded:
        index = json.loads((out / hf.SAFETENSORS_INDEX).read_text())
        assert set(index["weight_map"]) == set(hf.hf_param_names(cfg))
    reloaded = load_hf_reference(out)
    assert type(reloaded).__name__ == type(ref).__name__
    tokens = random_tokens(6, 2, 20, cfg.vocab_size)
    np.testing.assert_allclose(hf_logits(reloaded, tokens), hf_logits(ref, tokens), atol=1e-5, rtol=0)
    cfg2, params2 = hf.load_hf(out)
    assert cfg2 == cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_export_random_init_with_tokenizer(tmp_path):
    """A ramjax-initialised model (not from HF) exports with its tokenizer and matches transformers."""
    from tokenizer_fixtures import make_hf_tokenizer

    tok_dir = tmp_path / "tok"
    make_hf_tokenizer(tok_dir, "llama")
    cfg = ModelConfig(vocab_size=640, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=1,
                      head_dim=8, architecture="llama", eos_token_id=(5, 6), bos_token_id=3,
                      rope_scaling=RopeScaling("linear", 2.0))
    params = random_params(cfg, seed=11)
    hf.save_hf(tmp_path / "out", cfg, params, tokenizer_dir=tok_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / f).exists()
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["architectures"] == ["LlamaForCausalLM"] and conf["eos_token_id"] == [5, 6]
    tokens = random_tokens(7, 2, 12, 600)
    assert_logits_match(hf_logits(load_hf_reference(tmp_path / "out"), tokens), _ours(cfg, params, tokens))


def test_export_bfloat16(built, tmp_path):
    src, ref = built["qwen2_untied_mha"]
    cfg, params = hf.load_hf(src)
    hf.save_hf(tmp_path, cfg, params, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    stored = load_file(str(tmp_path / hf.SAFETENSORS_FILE))
    assert all(v.dtype == ml_dtypes.bfloat16 for v in stored.values())
    cfg2, params2 = hf.load_hf(tmp_path)
    assert cfg2.param_dtype == "bfloat16" and params2["embed"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(params2["embed"]),
                                  np.asarray(params["embed"]).astype(ml_dtypes.bfloat16))
    cfg3, params3 = hf.load_hf(tmp_path, param_dtype="float32")
    assert params3["lm_head"].dtype == jnp.float32
    tokens = random_tokens(8, 1, 12, cfg.vocab_size)
    np.testing.assert_allclose(_ours(cfg3, params3, tokens), hf_logits(ref, tokens), atol=0.3)


def test_export_rejects_unexpressible_bias(tmp_path):
    cfg = ModelConfig(architecture="qwen2", qkv_bias=True, o_bias=True)
    with pytest.raises(hf.UnsupportedArchitectureError, match="o_bias"):
        hf.hf_config_from_model_config(cfg)
    with pytest.raises(hf.UnsupportedArchitectureError, match="attention_bias"):
        hf.hf_config_from_model_config(ModelConfig(architecture="llama", qkv_bias=True))


# ----------------------------------------------------------------------------------------------------------------
# Sharded placement


def _record_reads(monkeypatch):
    reads = []
    orig = hf._SafetensorsReader.read

    def read(self, name, index):
        out = orig(self, name, index)
        reads.append((name, out.shape))
        return out

    monkeypatch.setattr(hf._SafetensorsReader, "read", read)
    return reads


@pytest.mark.parametrize("mesh_shape,rules", [
    ((1, 4, 2), shd.DEFAULT_RULES),
    # head_dim split over tensor: exercises reading a sub-range inside each head of q_proj's [H*Dh, D] rows
    ((2, 1, 4), tuple((k, "tensor" if k == "head_dim" else None if k in ("heads", "kv_heads") else v)
                      for k, v in shd.DEFAULT_RULES)),
])
def test_load_onto_mesh(built, monkeypatch, mesh_shape, rules):
    path, ref = built["llama_tied_bias"]
    mesh = shd.make_mesh(dict(zip(shd.MESH_AXES, mesh_shape)))
    reads = _record_reads(monkeypatch)
    cfg, params = hf.load_hf(path, mesh=mesh, rules=rules)
    reads = list(reads)
    expected = model_lib.param_shardings(cfg, mesh, rules)
    for (p, arr), want in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(expected)):
        assert arr.sharding.is_equivalent_to(want, arr.ndim), (jax.tree_util.keystr(p), arr.sharding, want)
    # every device got exactly its slice of the single-device load
    cfg1, full = hf.load_hf(path)
    for arr, ref_arr in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(full)):
        for s in arr.addressable_shards:
            np.testing.assert_array_equal(np.asarray(s.data), np.asarray(ref_arr)[s.index])
    # only the needed slices are read: on (1,4,2) q_proj.weight [H*Dh, D] = [32, 32] is split 2 ways in rows (heads
    # over tensor) and 4 ways in columns (embed over fsdp); each distinct block is read once (replicas are cached)
    q_reads = [shape for name, shape in reads if name.endswith("q_proj.weight")]
    if mesh_shape == (1, 4, 2):
        assert q_reads == [(16, 8)] * (8 * cfg.num_layers), q_reads
    else:  # head_dim split: the covering rows (all heads) are read, then sub-sliced within each head
        assert q_reads == [(32, 32)] * (4 * cfg.num_layers), q_reads
    tokens = random_tokens(9, 4, 16, cfg.vocab_size)
    fwd = jax.jit(lambda p, t: model_lib.forward(cfg, p, t, mesh=mesh, rules=rules)[0],
                  in_shardings=(expected, shd.batch_sharding(mesh, 2, rules)))
    assert_logits_match(hf_logits(ref, tokens), np.asarray(fwd(params, jnp.asarray(tokens))))


# ----------------------------------------------------------------------------------------------------------------
# Named errors


def test_missing_files(built, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        hf.load_hf(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_hf(tmp_path)
    src = built["llama_gqa1_untied"][0]
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(os.path.join(src, "config.json"), d)
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="model.safetensors.*pytorch_model.bin"):
        hf.load_hf(d)


def test_index_lists_missing_shard(tmp_path):
    make_hf_model(tmp_path, HFSpec(seed=8), max_shard_size="20KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        hf.load_hf(tmp_path)


@pytest.mark.parametrize("change,match", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "MistralForCausalLM.*LlamaForCausalLM"),
    ({"architectures": None, "model_type": "gemma"}, "gemma"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "yarn"),
    ({"hidden_act": "gelu"}, "gelu"),
])
def test_unsupported_architecture(built, change, match):
    conf = hf.read_hf_config(built["llama_gqa1_untied"][0])
    conf.update(change)
    with pytest.raises(hf.UnsupportedArchitectureError, match=match) as e:
        hf.config_from_hf(conf)
    assert "Qwen2ForCausalLM" in str(e.value)


def test_incomplete_config(built):
    conf = hf.read_hf_config(built["llama_gqa1_untied"][0])
    del conf["intermediate_size"]
    with pytest.raises(hf.CheckpointMismatchError, match="intermediate_size"):
        hf.config_from_hf(conf)


def test_qwen2_sliding_window_rejected(built):
    conf = hf.read_hf_config(built["qwen2_bias_tied"][0])
    conf.pop("layer_types", None)
    conf.update(use_sliding_window=True, max_window_layers=1, sliding_window=8)
    with pytest.raises(hf.UnsupportedArchitectureError, match="sliding"):
        hf.config_from_hf(conf)
    conf.update(max_window_layers=2)  # no layer at or beyond max_window_layers: all full attention
    assert hf.config_from_hf(conf).architecture == "qwen2"


def _edit_weights(src, dst, edit):
    shutil.copytree(src, dst)
    f = os.path.join(dst, hf.SAFETENSORS_FILE)
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_tensor_mismatches_are_named(built, tmp_path):
    src = built["llama_gqa1_untied"][0]
    name_k = "model.layers.1.self_attn.k_proj.weight"

    def wrong_shape(t):
        t[name_k] = np.zeros((16, 32), np.float32)

    _edit_weights(src, tmp_path / "shape", wrong_shape)
    with pytest.raises(hf.CheckpointMismatchError, match=r"k_proj.weight \(16, 32\).*\(8, 32\)") as e:
        hf.load_hf(tmp_path / "shape")
    assert list(e.value.mismatched) == [name_k] and not e.value.missing and not e.value.unexpected

    def missing_and_extra(t):
        del t["model.layers.0.mlp.up_proj.weight"]
        del t["lm_head.weight"]
        t["model.layers.0.self_attn.q_norm.weight"] = np.ones(8, np.float32)
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)  # ignored

    _edit_weights(src, tmp_path / "names", missing_and_extra)
    with pytest.raises(hf.CheckpointMismatchError, match="missing tensors: .*up_proj.weight") as e:
        hf.load_hf(tmp_path / "names")
    assert sorted(e.value.missing) == ["lm_head.weight", "model.layers.0.mlp.up_proj.weight"]
    assert e.value.unexpected == ["model.layers.0.self_attn.q_norm.weight"]
    assert "q_norm" in str(e.value)


def test_tied_checkpoint_with_lm_head_loads(built, tmp_path):
    src, ref = built["qwen2_bias_tied"]

    def add_head(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()

    _edit_weights(src, tmp_path / "m", add_head)
    cfg, params = hf.load_hf(tmp_path / "m")
    assert cfg.tie_word_embeddings and "lm_head" not in params
    tokens = random_tokens(10, 1, 8, cfg.vocab_size)
    assert_logits_match(hf_logits(ref, tokens), _ours(cfg, params, tokens))
