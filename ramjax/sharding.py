"""Device mesh and logical-axis sharding rules.

Weights and activations carry *logical* axis names (``embed``, ``heads``, ``act_batch``...). One rules table maps
each logical name to mesh axes (``data``, ``fsdp``, ``tensor``); every sharding in ramjax is derived from it, so
changing the parallelism of a run is a config change, never a code change.

Weights and activations use separate logical names on purpose: FSDP shards the weights' ``embed`` dimension over
``fsdp`` while the activations' batch is sharded over ``(data, fsdp)``; if both used one name they would collide.

The mesh uses ``AxisType.Auto`` on every axis: every hot path is a ``jax.jit`` with explicit ``in_shardings`` and
``out_shardings``, and XLA's partitioner propagates the rest (constraints inside the model are hints). We choose
Auto deliberately because ``jax.make_mesh`` defaults to Explicit axes, under which every contracted sharded matmul
would need an ``out_sharding`` annotation.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or tuple of axes, or None for replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # weights
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # KV cache
    ("cache_layers", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_seq", None),
    ("cache_kv_heads", "tensor"),
    ("cache_head_dim", None),
)


class ShardingError(ValueError):
    """A logical-axis rule cannot be applied to an array on a mesh."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Shape of the device mesh. ``-1`` on one axis means "all remaining devices"."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


def make_mesh(config: MeshConfig | Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a ``(data, fsdp, tensor)`` mesh with Auto axis types over ``devices`` (default: all devices)."""
    if config is None:
        config = MeshConfig()
    if isinstance(config, Mapping):
        config = MeshConfig(**config)
    devices = list(devices if devices is not None else jax.devices())
    sizes = [config.data, config.fsdp, config.tensor]
    if sum(s == -1 for s in sizes) > 1:
        raise ShardingError(f"mesh {sizes}: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"mesh axis sizes must be positive or -1, got data={sizes[0]} fsdp={sizes[1]} "
                            f"tensor={sizes[2]}")
    if -1 in sizes:
        if len(devices) % known:
            raise ShardingError(f"{len(devices)} devices cannot be split into mesh {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ShardingError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs {int(np.prod(sizes))} devices, "
            f"but {len(devices)} are available; change mesh.* so the product matches (or use -1 on one axis)")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _rule_table(rules: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    return {name: target for name, target in rules}


def logical_to_pspec(axes: Sequence[str | None], rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> PartitionSpec:
    """Maps a tuple of logical axis names to a ``PartitionSpec`` of mesh axes.

    A mesh axis is used at most once per array: if two logical dims map to the same mesh axis, the later one is
    replicated (e.g. ``vocab`` and ``heads`` both on ``tensor`` never occur in one weight; this is a safety net).
    """
    table = _rule_table(rules)
    used: set[str] = set()
    out = []
    for name in axes:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ShardingError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        target = table[name]
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t not in used)
        used.update(targets)
        out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*out)


def _mesh_size(mesh: Mesh, entry: Any) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else entry
    return int(np.prod([mesh.shape[n] for n in names]))


def named_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int] | None = None,
                   rules: Sequence[tuple[str, Any]] = DEFAULT_RULES, path: str = "array") -> NamedSharding:
    """``NamedSharding`` for an array with logical ``axes``; checks divisibility when ``shape`` is given."""
    try:
        spec = logical_to_pspec(axes, rules)
    except ShardingError as e:  # name the array whose axes have no rule
        raise ShardingError(f"{path}: logical axes {tuple(axes)}: {e}") from None
    if shape is not None:
        if len(shape) != len(axes):
            raise ShardingError(f"{path}: shape {tuple(shape)} has {len(shape)} dims but logical axes {tuple(axes)}")
        for dim, (size, entry, name) in enumerate(zip(shape, spec, axes)):
            n = _mesh_size(mesh, entry)
            if size % n:
                raise ShardingError(
                    f"{path}: dim {dim} ({name!r}) of shape {tuple(shape)} is {size}, not divisible by {n} "
                    f"(rule {name!r} -> {entry!r} on mesh {dict(mesh.shape)}); change the mesh or map {name!r} "
                    f"to None in the sharding rules")
    return NamedSharding(mesh, spec)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def tree_shardings(mesh: Mesh, logical_axes: Any, shapes: Any,
                   rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """Shardings for a pytree, given matching pytrees of logical axes (tuples) and shapes (ShapeDtypeStructs).

    Raises ``ShardingError`` naming the parameter path, its shape, the mesh and the rule on any mismatch.
    """
    flat_shapes, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    flat_axes = treedef.flatten_up_to(logical_axes)
    out = [named_sharding(mesh, axes, s.shape, rules, _path_str(p)) for (p, s), axes in zip(flat_shapes, flat_axes)]
    return jax.tree_util.tree_unflatten(treedef, out)


def shard_tree(tree: Any, shardings: Any) -> Any:
    """Places every array of ``tree`` on its sharding (works for host numpy arrays and device arrays)."""
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s), tree, shardings)


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a ``[batch, ...]`` input array: batch over ``(data, fsdp)``, other dims replicated."""
    return NamedSharding(mesh, logical_to_pspec(("act_batch",) + (None,) * (ndim - 1), rules))


def batch_divisor(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> int:
    """Number of shards the batch dimension is split into; global batch sizes must be a multiple of it."""
    return _mesh_size(mesh, logical_to_pspec(("act_batch",), rules)[0])


def vocab_parallel_take(table_vd: jax.Array, tokens_bt: jax.Array, mesh: Mesh | None,
                        rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> jax.Array:
    """Embedding lookup ``table_vd[tokens_bt]`` -> ``[batch, seq, embed]`` for a table whose ``vocab`` rows may be
    sharded.

    A plain gather from a vocab-sharded table into batch-sharded activations makes XLA's partitioner replicate the
    gathered result and re-slice it ("involuntary full rematerialization"). Here each vocab shard looks up the ids
    that fall in its rows, zeros the others, and one ``psum`` over the vocab's mesh axes adds the partial results
    (Megatron's vocab-parallel embedding), already in the batch layout. Without a mesh, or with ``vocab``
    unsharded, it is ``jnp.take``. The batch stays sharded as ``act_batch`` when its size divides, else it is
    replicated.
    """
    if mesh is None:
        return jnp.take(table_vd, tokens_bt, axis=0)
    vocab = logical_to_pspec(("vocab",), rules)[0]
    v_axes = (vocab,) if isinstance(vocab, str) else tuple(vocab or ())
    if _mesh_size(mesh, v_axes or None) == 1 or table_vd.shape[0] % _mesh_size(mesh, v_axes):
        return jnp.take(table_vd, tokens_bt, axis=0)
    batch = logical_to_pspec(("act_batch",), rules)[0]
    b_axes = tuple(a for a in ((batch,) if isinstance(batch, str) else tuple(batch or ())) if a not in v_axes)
    if not b_axes or tokens_bt.shape[0] % _mesh_size(mesh, b_axes):
        b_axes = ()
    b_spec = None if not b_axes else b_axes[0] if len(b_axes) == 1 else b_axes
    v_spec = v_axes[0] if len(v_axes) == 1 else v_axes

    def local(table, tokens):
        rows = table.shape[0]
        ids = tokens - jax.lax.axis_index(v_axes) * rows
        mine = (ids >= 0) & (ids < rows)
        x = jnp.take(table, jnp.where(mine, ids, 0), axis=0)
        return jax.lax.psum(jnp.where(mine[..., None], x, jnp.zeros_like(x)), v_axes)

    return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(v_spec, None), PartitionSpec(b_spec, None)),
                         out_specs=PartitionSpec(b_spec, None, None))(table_vd, tokens_bt)


def constrain(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None,
              rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op without a mesh or when a dim does not divide."""
    if mesh is None:
        return x
    spec = logical_to_pspec(axes, rules)
    if any(size % _mesh_size(mesh, e) for size, e in zip(x.shape, spec)):
        return x  # e.g. a batch of 1 while sampling: leave the layout to the partitioner
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that keeps a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def to_global(batch: Mapping[str, Any], shardings: Mapping[str, Any]) -> dict[str, jax.Array]:
    """This process's rows -> global arrays on ``shardings`` (one code path for one and many processes)."""
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(batch[k])) for k, sh in shardings.items()}
