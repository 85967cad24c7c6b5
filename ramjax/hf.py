"""Hugging Face checkpoints in and out: ``LlamaForCausalLM`` and ``Qwen2ForCausalLM`` directories.

``load_hf`` reads ``config.json`` (plain JSON: no code from the checkpoint directory is ever executed) and the
safetensors weights (``model.safetensors`` or a sharded ``model.safetensors.index.json``), and places every weight
directly onto its sharding: each device's shard is read from the memory-mapped files slice by slice through
``jax.make_array_from_callback``, one weight family at a time, so no host ever holds two full copies of the model.

``save_hf`` writes a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads and that gives the
same logits (``config.json``, safetensors sharded with an index when large, optional tokenizer files).

Layout conversion is transpose and reshape only: our rotary embeddings use Hugging Face's half-split layout, so no
q/k permutation is needed. Per layer, with ``H`` heads, ``K`` kv heads, ``Dh`` head dim, ``D`` hidden, ``F`` MLP::

    q_proj.weight [H*Dh, D]  -> wq [D, H, Dh]      o_proj.weight    [D, H*Dh] -> wo     [H, Dh, D]
    k_proj.weight [K*Dh, D]  -> wk [D, K, Dh]      gate/up_proj     [F, D]    -> w_gate/w_up [D, F]
    q_proj.bias   [H*Dh]     -> bq [H, Dh]         down_proj.weight [D, F]    -> w_down [F, D]
    embed_tokens  [V, D]     -> embed [V, D]       lm_head.weight   [V, D]    -> lm_head [D, V]

and the per-layer tensors are stacked on the leading ``layers`` axis.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from ramjax import files
from ramjax import model as model_lib
from ramjax import sharding as shd
from ramjax.model import ModelConfig, RopeScaling

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES: dict[str, str] = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_MODEL_TYPES = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Tokenizer-side files copied by ``save_hf(tokenizer_dir=...)`` when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry; recomputed from the config
_WHOLE_FAMILY_BYTES = 256 * 2**20  # save_hf fetches a stacked weight whole below this size, else layer by layer
_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
              "float16": np.dtype(np.float16)}


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture (or one of its features, e.g. a rope type) is not implemented."""


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match its config: missing, unexpected or mis-shaped tensors.

    ``missing``, ``unexpected`` and ``mismatched`` hold the offending tensor names (``mismatched`` maps a name to
    ``(found_shape, expected_shape)``).
    """

    def __init__(self, message: str, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
                 mismatched: Mapping[str, tuple] | None = None):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = dict(mismatched or {})


class ModelFileError(ValueError):
    """A file of a model directory cannot be read: malformed ``config.json`` or index, truncated or damaged
    safetensors. The message names the file and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Configs


def _unsupported(what: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"{what}; ramjax supports architectures {sorted(SUPPORTED_ARCHITECTURES)} (model_type "
        f"{sorted(_MODEL_TYPES)}) with rope types {list(SUPPORTED_ROPE_TYPES)}")


def _architecture(hf_config: Mapping[str, Any]) -> str:
    archs = hf_config.get("architectures") or []
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[a]
    if archs:
        raise _unsupported(f"architecture {archs} is not supported")
    model_type = hf_config.get("model_type")
    if model_type in _MODEL_TYPES:
        return model_type
    raise _unsupported(f"config has no supported 'architectures' entry and model_type {model_type!r}")


def _rope(hf_config: Mapping[str, Any], max_pos: int) -> tuple[float, RopeScaling | None]:
    """``(rope_theta, scaling)`` from a v5 ``rope_parameters`` dict or v4 ``rope_theta`` + ``rope_scaling``."""
    params = hf_config.get("rope_parameters")
    if isinstance(params, Mapping) and isinstance(params.get("full_attention"), Mapping):
        params = params["full_attention"]  # v5 nests per layer type in some configs
    scaling = hf_config.get("rope_scaling")  # v4; transformers v5 also gives it priority when present
    rp: dict[str, Any] = dict(params or {})
    rp.update(scaling or {})
    theta = float(rp.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
    partial = rp.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise _unsupported(f"partial_rotary_factor={partial} is not supported")
    rope_type = rp.get("rope_type", rp.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise _unsupported(f"rope type {rope_type!r} is not supported")
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, RopeScaling(rope_type="linear", factor=float(rp["factor"]))
    return theta, RopeScaling(
        rope_type="llama3", factor=float(rp["factor"]), low_freq_factor=float(rp["low_freq_factor"]),
        high_freq_factor=float(rp["high_freq_factor"]),
        original_max_position_embeddings=int(rp.get("original_max_position_embeddings", max_pos)))


def _storage_dtype(hf_config: Mapping[str, Any]) -> str:
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    name = str(name).replace("torch.", "")
    return name if name in _NP_DTYPES else "float32"


def config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
    """``ModelConfig`` from a parsed Hugging Face ``config.json`` (transformers v4 or v5 style).

    The storage dtype follows the checkpoint's ``dtype``/``torch_dtype`` (float32 when absent); compute is float32.
    Raises ``UnsupportedArchitectureError`` for anything but Llama/Qwen2 causal LMs with default, linear or
    llama3 rotary embeddings, SiLU MLPs and full (not sliding-window) attention.
    """
    arch = _architecture(hf_config)
    g = hf_config.get
    absent = [k for k in _REQUIRED_KEYS if g(k) is None]
    if absent:
        raise CheckpointMismatchError(f"config.json lacks required keys {absent} for a {arch} model")
    act = g("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise _unsupported(f"hidden_act {act!r} is not supported (SwiGLU with silu only)")
    hidden, heads, layers = int(g("hidden_size")), int(g("num_attention_heads")), int(g("num_hidden_layers"))
    max_pos = int(g("max_position_embeddings") or (2048 if arch == "llama" else 32768))
    theta, scaling = _rope(hf_config, max_pos)
    if arch == "qwen2":
        layer_types = g("layer_types")
        if layer_types is None and g("use_sliding_window", False):
            layer_types = ["sliding_attention" if i >= int(g("max_window_layers", 28)) else "full_attention"
                           for i in range(layers)]
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise _unsupported("sliding-window attention (use_sliding_window / layer_types) is not supported")
        bias = dict(qkv_bias=True, o_bias=False, mlp_bias=False)
        default_ids: dict[str, Any] = dict(bos_token_id=None, eos_token_id=None)
    else:
        attn_bias = bool(g("attention_bias", False))
        bias = dict(qkv_bias=attn_bias, o_bias=attn_bias, mlp_bias=bool(g("mlp_bias", False)))
        default_ids = dict(bos_token_id=1, eos_token_id=2)  # LlamaConfig's defaults when the keys are absent
    eos = hf_config["eos_token_id"] if "eos_token_id" in hf_config else default_ids["eos_token_id"]
    if isinstance(eos, (list, tuple)):
        eos = tuple(int(e) for e in eos)
    bos = hf_config["bos_token_id"] if "bos_token_id" in hf_config else default_ids["bos_token_id"]
    return ModelConfig(
        vocab_size=int(g("vocab_size")), hidden_size=hidden, intermediate_size=int(g("intermediate_size")),
        num_layers=layers, num_heads=heads, num_kv_heads=int(g("num_key_value_heads") or heads),
        head_dim=int(g("head_dim") or hidden // heads), architecture=arch,
        rms_norm_eps=float(g("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        tie_word_embeddings=bool(g("tie_word_embeddings", False)), max_position_embeddings=max_pos,
        dtype="float32", param_dtype=_storage_dtype(hf_config), bos_token_id=bos, eos_token_id=eos,
        pad_token_id=g("pad_token_id"), **bias)


def hf_config_from_model_config(cfg: ModelConfig) -> dict[str, Any]:
    """A ``config.json`` dict that transformers v4 and v5 both read as ``cfg``.

    Rotary settings are written in both styles: v5's ``rope_parameters`` and v4's ``rope_theta`` + ``rope_scaling``
    (v5 gives ``rope_scaling`` priority, and both agree). Raises ``UnsupportedArchitectureError`` when the bias
    layout cannot be expressed (Llama: one ``attention_bias`` for q/k/v/o; Qwen2: q/k/v bias only, no MLP bias).
    """
    if cfg.architecture == "qwen2":
        if not cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
            raise _unsupported(f"a Qwen2 checkpoint always has q/k/v bias and no o/MLP bias; got qkv_bias="
                               f"{cfg.qkv_bias}, o_bias={cfg.o_bias}, mlp_bias={cfg.mlp_bias}")
    elif cfg.qkv_bias != cfg.o_bias:
        raise _unsupported(f"a Llama checkpoint has one attention_bias for q/k/v/o; got qkv_bias={cfg.qkv_bias}, "
                           f"o_bias={cfg.o_bias}")
    rope: dict[str, Any] = {"rope_theta": float(cfg.rope_theta), "rope_type": "default"}
    rs = cfg.rope_scaling
    scaling = None
    if rs is not None:
        scaling = {"rope_type": rs.rope_type, "factor": float(rs.factor)}
        if rs.rope_type == "llama3":
            scaling.update(low_freq_factor=float(rs.low_freq_factor), high_freq_factor=float(rs.high_freq_factor),
                           original_max_position_embeddings=int(rs.original_max_position_embeddings))
        rope.update(scaling)
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    out: dict[str, Any] = {
        "architectures": [_MODEL_TYPES[cfg.architecture]],
        "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope,
        "rope_theta": float(cfg.rope_theta),
        "rope_scaling": scaling,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": cfg.pad_token_id,
        "dtype": cfg.param_dtype,
        "torch_dtype": cfg.param_dtype,
    }
    if cfg.architecture == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, pretraining_tp=1)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers,
                   layer_types=["full_attention"] * cfg.num_layers)
    return out


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a Hugging Face directory (JSON only; nothing is executed)."""
    path = os.fspath(path)
    f = os.path.join(path, "config.json")
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{path!r} has no config.json; pass a Hugging Face model directory (config.json "
                                f"and {SAFETENSORS_FILE} or {SAFETENSORS_INDEX})")
    try:
        with open(f, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{f} is not valid JSON ({e}); restore the model's config.json (e.g. copy it "
                                      f"again from the model's source)") from None
    if not isinstance(cfg, dict):
        raise ModelFileError(f"{f} holds a JSON {type(cfg).__name__}, not a config object; restore the "
                                      f"model's config.json")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Name map


@dataclasses.dataclass(frozen=True)
class _TensorMap:
    """How one of our params relates to Hugging Face tensor(s).

    Per layer, ``ours = hf.reshape(view).transpose(perm)``; ``groups[i]`` lists the ``view`` dims that HF dim ``i``
    splits into (e.g. ``q_proj.weight [H*Dh, D]`` has ``view (H, Dh, D)``, ``groups ((0, 1), (2,))``).
    """

    path: tuple[str, ...]
    hf_name: str  # "{i}" stands for the layer index when ``stacked``
    view: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]
    perm: tuple[int, ...]
    stacked: bool

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(math.prod(self.view[d] for d in g) for g in self.groups)

    @property
    def shape(self) -> tuple[int, ...]:
        """Our per-layer shape."""
        return tuple(self.view[p] for p in self.perm)

    def names(self, num_layers: int) -> list[str]:
        return [self.hf_name.format(i=i) for i in range(num_layers)] if self.stacked else [self.hf_name]


def _tensor_maps(cfg: ModelConfig, prefix: str = "model.") -> list[_TensorMap]:
    """Every parameter of ``cfg`` with its HF name and layout, in the order HF checkpoints list them."""
    D, H, K, Dh, F, V = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                         cfg.vocab_size)
    lp = prefix + "layers.{i}."
    T = _TensorMap
    ident = ((0,),)
    maps = [T(("embed",), prefix + "embed_tokens.weight", (V, D), ((0,), (1,)), (0, 1), False),
            T(("layers", "attn_norm", "scale"), lp + "input_layernorm.weight", (D,), ident, (0,), True),
            T(("layers", "wq"), lp + "self_attn.q_proj.weight", (H, Dh, D), ((0, 1), (2,)), (2, 0, 1), True),
            T(("layers", "wk"), lp + "self_attn.k_proj.weight", (K, Dh, D), ((0, 1), (2,)), (2, 0, 1), True),
            T(("layers", "wv"), lp + "self_attn.v_proj.weight", (K, Dh, D), ((0, 1), (2,)), (2, 0, 1), True)]
    if cfg.qkv_bias:
        maps += [T(("layers", "bq"), lp + "self_attn.q_proj.bias", (H, Dh), ((0, 1),), (0, 1), True),
                 T(("layers", "bk"), lp + "self_attn.k_proj.bias", (K, Dh), ((0, 1),), (0, 1), True),
                 T(("layers", "bv"), lp + "self_attn.v_proj.bias", (K, Dh), ((0, 1),), (0, 1), True)]
    maps.append(T(("layers", "wo"), lp + "self_attn.o_proj.weight", (D, H, Dh), ((0,), (1, 2)), (1, 2, 0), True))
    if cfg.o_bias:
        maps.append(T(("layers", "bo"), lp + "self_attn.o_proj.bias", (D,), ident, (0,), True))
    maps += [T(("layers", "mlp_norm", "scale"), lp + "post_attention_layernorm.weight", (D,), ident, (0,), True),
             T(("layers", "w_gate"), lp + "mlp.gate_proj.weight", (F, D), ((0,), (1,)), (1, 0), True),
             T(("layers", "w_up"), lp + "mlp.up_proj.weight", (F, D), ((0,), (1,)), (1, 0), True),
             T(("layers", "w_down"), lp + "mlp.down_proj.weight", (D, F), ((0,), (1,)), (1, 0), True)]
    if cfg.mlp_bias:
        maps += [T(("layers", "b_gate"), lp + "mlp.gate_proj.bias", (F,), ident, (0,), True),
                 T(("layers", "b_up"), lp + "mlp.up_proj.bias", (F,), ident, (0,), True),
                 T(("layers", "b_down"), lp + "mlp.down_proj.bias", (D,), ident, (0,), True)]
    maps.append(T(("final_norm", "scale"), prefix + "norm.weight", (D,), ident, (0,), False))
    if not cfg.tie_word_embeddings:
        maps.append(T(("lm_head",), "lm_head.weight", (V, D), ((0,), (1,)), (1, 0), False))
    return maps


def hf_param_names(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """``{hf tensor name: shape}`` of a checkpoint for ``cfg`` (what ``save_hf`` writes and ``load_hf`` needs)."""
    return {n: m.hf_shape for m in _tensor_maps(cfg) for n in m.names(cfg.num_layers)}


def _get(tree: Mapping, path: Sequence[str]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: Sequence[str], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------------------------------------------
# Loading


class _SafetensorsReader:
    """Lazy, memory-mapped access to the tensors of one checkpoint (single file or sharded with an index)."""

    def __init__(self, path: str, stack: contextlib.ExitStack):
        from safetensors import safe_open

        index = os.path.join(path, SAFETENSORS_INDEX)
        single = os.path.join(path, SAFETENSORS_FILE)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as fh:
                    weight_map: dict[str, str] = json.load(fh)["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise ModelFileError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e}); "
                                              f"download or export the model again") from None
            files = sorted(set(weight_map.values()))
            absent = [f for f in files if not os.path.isfile(os.path.join(path, f))]
            if absent:
                raise FileNotFoundError(f"{index!r} lists weight files that are missing from {path!r}: {absent}")
        elif os.path.isfile(single):
            files = [SAFETENSORS_FILE]
        else:
            others = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".h5", ".msgpack")))
            hint = (f" (found {others}: convert them to safetensors with transformers' save_pretrained("
                    f"safe_serialization=True); pickled weights are never loaded)") if others else ""
            raise FileNotFoundError(f"{path!r} has neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}{hint}")
        self._handles = {}
        for f in files:
            try:
                self._handles[f] = stack.enter_context(safe_open(os.path.join(path, f), framework="numpy"))
            except Exception as e:  # noqa: BLE001 -- safetensors raises its own SafetensorError for bad files
                raise ModelFileError(
                    f"{os.path.join(path, f)} is not a readable safetensors file ({type(e).__name__}: {e}); it is "
                    f"truncated or damaged: download or export the model again") from None
        # The index may be stale; the file headers are the truth.
        self._where = {name: h for h in self._handles.values() for name in h.keys()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(h.get_slice(n).get_shape()) for n, h in self._where.items()}

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return self._where[name].get_slice(name)[index]


def _check_tensors(found: Mapping[str, tuple], expected: Mapping[str, tuple], optional: Mapping[str, tuple],
                   where: str) -> None:
    """Raises ``CheckpointMismatchError`` listing missing, unexpected and mis-shaped tensors."""
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected and n not in optional and not n.endswith(_IGNORED_SUFFIXES)]
    want = {**optional, **expected}
    mismatched = {n: (found[n], want[n]) for n in found if n in want and tuple(found[n]) != tuple(want[n])}
    if not (missing or unexpected or mismatched):
        return

    def show(names):
        names = list(names)
        return ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")

    parts = []
    if missing:
        parts.append(f"missing tensors: {show(missing)}")
    if unexpected:
        parts.append(f"unexpected tensors: {show(unexpected)}")
    if mismatched:
        parts.append("wrong shapes: " + show(f"{n} {tuple(a)} (config needs {tuple(b)})"
                                             for n, (a, b) in mismatched.items()))
    raise CheckpointMismatchError(
        f"{where}: the weights do not match config.json; " + "; ".join(parts)
        + ". Check that config.json belongs to these weights.", missing, unexpected, mismatched)


def _block_reader(reader: _SafetensorsReader, m: _TensorMap, names: list[str], np_dtype: np.dtype
                  ) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """Callback giving the block ``index`` (slices over our full, possibly stacked, shape) of parameter ``m``.

    Reads only the rows/columns that the block needs: for a split HF dim (e.g. ``H*Dh``) the covering range of its
    leading sub-dim is read, then reshaped and sub-sliced. Repeated requests for one block (replicated shards) are
    served from a small cache that lives as long as this weight family.
    """
    shape = ((len(names),) if m.stacked else ()) + m.shape
    cache: dict[tuple, np.ndarray] = {}
    inv = np.argsort(m.perm)

    def one(name: str, idx: Sequence[tuple[int, int]]) -> np.ndarray:
        view_idx = [idx[inv[v]] for v in range(len(m.view))]  # our dim j is view dim perm[j]
        hf_idx, view_shape, sub = [], [], []
        for g in m.groups:
            (a, b), inner = view_idx[g[0]], math.prod(m.view[d] for d in g[1:])
            hf_idx.append(slice(a * inner, b * inner))
            view_shape += [b - a] + [m.view[d] for d in g[1:]]
            sub += [slice(None)] + [slice(*view_idx[d]) for d in g[1:]]
        block = np.asarray(reader.read(name, tuple(hf_idx))).reshape(view_shape)[tuple(sub)]
        return block.transpose(m.perm).astype(np_dtype)

    def callback(index: tuple[slice, ...] | None) -> np.ndarray:
        index = tuple(index or (slice(None),) * len(shape))
        bounds = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        if bounds not in cache:
            if m.stacked:
                (l0, l1), rest = bounds[0], bounds[1:]
                cache[bounds] = np.stack([one(names[i], rest) for i in range(l0, l1)])
            else:
                cache[bounds] = one(names[0], bounds)
        return cache[bounds]

    return callback


def load_hf(path: str | os.PathLike, *, mesh: Mesh | None = None, dtype: str | None = None,
            param_dtype: str | None = None, rules=shd.DEFAULT_RULES) -> tuple[ModelConfig, dict]:
    """Loads a Hugging Face ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` directory into ``(ModelConfig, params)``.

    path:        directory with ``config.json`` and ``model.safetensors`` or ``model.safetensors.index.json``.
    mesh:        place each parameter directly onto ``model.param_shardings(cfg, mesh, rules)``, reading from disk
                 only the slice each local device needs; default: everything on the first local device.
    dtype:       compute dtype override (default float32).
    param_dtype: storage dtype override (default: the checkpoint's ``dtype``/``torch_dtype``).
    ``cfg.vocab_size`` is the number of embedding rows in the weights (which may exceed the tokenizer's vocabulary,
    e.g. Qwen2.5's padded rows). Raises ``FileNotFoundError`` for missing files, ``UnsupportedArchitectureError``
    and ``CheckpointMismatchError`` (listing the offending tensor names).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Hugging Face model path {path!r} is not a directory")
    hf_config = read_hf_config(path)
    cfg = config_from_hf(hf_config)
    over = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
    with contextlib.ExitStack() as stack:
        reader = _SafetensorsReader(path, stack)
        found = reader.shapes()
        # Checkpoints saved from the bare decoder lack the "model." prefix; accept both.
        prefix = "" if "embed_tokens.weight" in found and "model.embed_tokens.weight" not in found else "model."
        rows = found.get(prefix + "embed_tokens.weight", (cfg.vocab_size,))[0]
        if rows != cfg.vocab_size:
            log.warning("%s: config.json says vocab_size=%d but the embedding has %d rows; using %d",
                        path, cfg.vocab_size, rows, rows)
            over["vocab_size"] = int(rows)
        cfg = cfg.replace(**over) if over else cfg
        maps = _tensor_maps(cfg, prefix)
        expected = {n: m.hf_shape for m in maps for n in m.names(cfg.num_layers)}
        optional = {}
        if cfg.tie_word_embeddings:  # tied checkpoints may still ship the (identical) head; it is not used
            optional["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
        _check_tensors(found, expected, optional, f"checkpoint {path!r}")

        if mesh is not None:
            shardings = model_lib.param_shardings(cfg, mesh, rules)
        else:
            dev = SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree_util.tree_map(lambda _: dev, model_lib.param_shapes(cfg))
        np_dtype = _NP_DTYPES[cfg.param_dtype]
        params: dict = {}
        for m in maps:  # one weight family at a time
            names = m.names(cfg.num_layers)
            shape = ((len(names),) if m.stacked else ()) + m.shape
            arr = jax.make_array_from_callback(shape, _get(shardings, m.path),
                                               _block_reader(reader, m, names, np_dtype), dtype=np_dtype)
            _set(params, m.path, arr)
    log.info("loaded %s (%s, %d layers, %d params)", path, cfg.architecture, cfg.num_layers,
             model_lib.count_params(params))
    return cfg, params


# ----------------------------------------------------------------------------------------------------------------
# Saving


def _to_host(x: Any) -> np.ndarray:
    """A full host copy of ``x`` (gathers across processes when the array is not fully addressable)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _hf_tensors(cfg: ModelConfig, params: Mapping, np_dtype: np.dtype
                ) -> Iterator[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """``(hf name, hf shape, producer)`` for every tensor, producing one layer slice at a time."""
    for m in _tensor_maps(cfg):
        arr = _get(params, m.path)
        want = ((cfg.num_layers,) if m.stacked else ()) + m.shape
        if tuple(arr.shape) != want:
            raise CheckpointMismatchError(f"params/{'/'.join(m.path)} has shape {tuple(arr.shape)} but the config "
                                          f"needs {want}", mismatched={"/".join(m.path): (arr.shape, want)})
        inv = tuple(int(i) for i in np.argsort(m.perm))
        # Small families are fetched whole (no per-layer slicing ops to compile); large ones a layer at a time so
        # that host memory stays at one layer's tensor.
        whole = [None] if m.stacked and arr.nbytes <= _WHOLE_FAMILY_BYTES else []
        for i, name in enumerate(m.names(cfg.num_layers)):
            def produce(arr=arr, i=i, m=m, inv=inv, whole=whole, m_last=cfg.num_layers - 1):
                if not m.stacked:
                    x = _to_host(arr)
                elif whole:
                    if whole[0] is None:
                        whole[0] = _to_host(arr)
                    x = whole[0][i]
                    if i == m_last:
                        whole[0] = None  # release the family once its last layer is written
                else:
                    x = _to_host(arr[i])
                return np.ascontiguousarray(x.transpose(inv).reshape(m.hf_shape).astype(np_dtype))
            yield name, m.hf_shape, produce


def save_hf(path: str | os.PathLike, cfg: ModelConfig, params: Mapping, *,
            tokenizer_dir: str | os.PathLike | None = None, max_shard_bytes: int = 5 * 2**30,
            dtype: str | None = None) -> None:
    """Writes ``params`` as a Hugging Face checkpoint directory that ``transformers`` loads.

    Files: ``config.json`` (from ``hf_config_from_model_config``), ``model.safetensors`` or, when the tensors
    exceed ``max_shard_bytes``, ``model-0000k-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``;
    and the tokenizer files of ``tokenizer_dir`` when given. Tensors are stored in ``dtype`` (default
    ``cfg.param_dtype``). Tensors are fetched one layer slice at a time and at most one shard is held in memory;
    in multi-process runs every process must call this (gathers are collective) and process 0 writes.
    Weight files this function would write that already exist in ``path`` are replaced.
    """
    from safetensors.numpy import save_file

    path = os.fspath(path)
    dtype = dtype or cfg.param_dtype
    if dtype not in _NP_DTYPES:
        raise ValueError(f"dtype {dtype!r} cannot be saved; choose one of {sorted(_NP_DTYPES)}")
    np_dtype = _NP_DTYPES[dtype]
    hf_config = hf_config_from_model_config(cfg.replace(param_dtype=dtype))
    tensors = list(_hf_tensors(cfg, params, np_dtype))
    shards: list[list[int]] = [[]]
    size = 0
    for k, (_, shape, _) in enumerate(tensors):
        nbytes = math.prod(shape) * np_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
        for f in os.listdir(path):
            if f in (SAFETENSORS_FILE, SAFETENSORS_INDEX) or f.startswith(".tmp.") or (
                    f.startswith("model-") and f.endswith(".safetensors")):
                log.info("replacing %s", os.path.join(path, f))
                os.remove(os.path.join(path, f))
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for s, ks in enumerate(shards):
        fname = SAFETENSORS_FILE if n == 1 else f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        chunk = {}
        for k in ks:
            name, _, produce = tensors[k]
            chunk[name] = produce()
            weight_map[name] = fname
            total += chunk[name].nbytes
        if writer:  # to a temporary name first: a killed export never leaves a torn shard under the real name
            tmp = os.path.join(path, f".tmp.{fname}")
            save_file(chunk, tmp, metadata={"format": "pt"})
            os.replace(tmp, os.path.join(path, fname))
        del chunk
    if writer:
        if n > 1:
            files.atomic_write_json(os.path.join(path, SAFETENSORS_INDEX),
                                    {"metadata": {"total_size": total}, "weight_map": weight_map})
        files.atomic_write_json(os.path.join(path, "config.json"), hf_config, sort_keys=True)
        if tokenizer_dir is not None:
            copied = []
            for f in TOKENIZER_FILES:
                src = os.path.join(os.fspath(tokenizer_dir), f)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(path, f))
                    copied.append(f)
            if not copied:
                raise FileNotFoundError(f"tokenizer_dir {os.fspath(tokenizer_dir)!r} has none of {TOKENIZER_FILES}")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"ramjax.hf.save_hf:{path}")
    log.info("saved %s (%d tensors in %d file(s), %.1f MB)", path, len(tensors), n, total / 1e6)


__all__ = ["CheckpointMismatchError", "UnsupportedArchitectureError", "SUPPORTED_ARCHITECTURES", "config_from_hf",
           "hf_config_from_model_config", "hf_param_names", "load_hf", "read_hf_config", "save_hf"]
