"""The typed run configs of ramjax: ``TrainConfig`` (``train.py``: one training stage and its sections),
``TokenizerConfig`` and ``SampleConfig`` (``sample.py``), each a frozen dataclass whose ``validate`` holds its
cross-field rules; defaults are the papers' settings (RAM: arXiv 2505.19700; TrRa: arXiv 2506.12704) where the
papers give one.

    cfg = load_config(TrainConfig, "configs/ram.yaml", ["optimizer.lr=1e-6", "ram.alpha=1e-3", "mesh.fsdp=8"])

Loading is strict (an unknown key is a ``ConfigError`` with a did-you-mean, a wrong type names the key, the expected
and the given type): the machinery is ``ramjax.config_io`` (YAML files with ``include:``, dotted overrides, type
checks, saving), whose functions are re-exported here.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Literal

from ramjax import loss as loss_lib
from ramjax.config_io import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    format_config,
    load_config,
    override_config,
    read_yaml,
    save_config,
    split_cli_args,
    validate_config,
)
from ramjax.model import AttentionImpl, DType, ModelConfig
from ramjax.sampling_params import SamplingParams

__all__ = [
    "ConfigError", "load_config", "config_from_dict", "override_config", "config_to_dict", "save_config",
    "format_config", "validate_config", "split_cli_args", "read_yaml", "apply_overrides",
    "TrainConfig", "SampleConfig", "ModelSection", "DataConfig",
    "OptimizerConfig", "ScheduleConfig", "MeshSection", "CheckpointConfig", "LoggingConfig", "RamConfig",
    "DpoConfig", "TrraConfig", "InraConfig", "DistributedConfig", "TokenizerConfig",
]


# ------------------------------------------------------------------------------------------------------------
# The schema of train.py

Stage = Literal["pretrain", "sft", "dpo", "ram", "trra"]
DataFormat = Literal["auto", "sft", "chat", "preference", "text", "proposal_samples"]
Template = Literal["plain", "chat"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


_MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The model being trained.

    init:        ``scratch`` (build from ``arch``) or the path of a Hugging Face directory or ramjax checkpoint.
    arch:        the architecture of a model built from scratch, a ``ramjax.model.ModelConfig`` (its shape keys:
                 ``vocab_size`` — 0 takes the tokenizer's size —, ``hidden_size``, ``num_layers``, ``architecture``,
                 ``rope_scaling`` ...; dtypes, remat and attention are set here, token ids by the tokenizer). Aligner
                 size ablations change only these keys. Ignored when the model is loaded from a checkpoint (its own
                 config.json / ramjax_model.json wins).
    dtype:       compute dtype (``bfloat16`` as in the paper, ``float32`` for exact tests on CPU); logits and
                 softmax stay float32 and the trained model keeps ``param_dtype`` master weights.
    remat:       rematerialise each layer in the backward pass (less memory, ~1/3 more compute).
    attention_impl: how training/prefill attention runs (same function, different memory/speed): ``xla`` (float32
                 einsum, the reference), ``dot_product`` (``jax.nn.dot_product_attention``), ``cudnn`` (cuDNN flash
                 attention, NVIDIA GPUs, bf16), ``chunked`` (``attention_chunk`` queries at a time, any backend; scores
                 never exceed ``[batch, heads, chunk, seq]``), ``splash`` (Pallas splash attention, TPUs).
    attention_chunk: query block of ``chunked`` and the block size of ``splash`` (a multiple of 128 on TPU).
    loss_chunk_size: > 0 applies the LM head and the loss to this many sequence positions at a time, recomputed in
                 the backward pass (``loss.chunked_sums``), so no ``[batch, seq, vocab]`` logits exist for the whole
                 sequence (at Qwen's 152k vocabulary and 4k contexts they are GBs per row); 0 = off. Same values.
    """

    init: str = "scratch"
    arch: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(vocab_size=0))
    # set here rather than in ``arch`` (see _ARCH_SET_ELSEWHERE); their defaults are ModelConfig's own
    dtype: DType = _MODEL_DEFAULTS["dtype"]
    param_dtype: DType = _MODEL_DEFAULTS["param_dtype"]
    remat: bool = _MODEL_DEFAULTS["remat"]
    attention_impl: AttentionImpl = _MODEL_DEFAULTS["attention_impl"]
    attention_chunk: int = _MODEL_DEFAULTS["attention_chunk"]
    loss_chunk_size: int = _MODEL_DEFAULTS["loss_chunk_size"]

    def validate(self) -> None:
        _check(bool(self.init.strip()), "model.init is empty; give 'scratch' or a model directory")
        _check(self.attention_chunk >= 1, f"model.attention_chunk={self.attention_chunk} must be >= 1")
        default = ModelConfig()
        for name in _ARCH_SET_ELSEWHERE:
            _check(getattr(self.arch, name) == getattr(default, name),
                   f"model.arch.{name} is not an architecture key: set "
                   + (f"model.{name}" if hasattr(self, name) else "the tokenizer (token ids come from it)"))
        _check(self.loss_chunk_size >= 0, f"model.loss_chunk_size={self.loss_chunk_size} must be >= 0 (0 = off)")

    @property
    def from_scratch(self) -> bool:
        return self.init == "scratch"

    def model_config(self, vocab_size: int | None = None, bos_token_id: int | None = None,
                     eos_token_id: int | tuple[int, ...] | None = None, pad_token_id: int | None = None
                     ) -> ModelConfig:
        """The ``ModelConfig`` of a from-scratch model: ``arch`` with this section's dtypes, remat and attention,
        the tokenizer's token ids, and ``vocab_size`` filling ``arch.vocab_size: 0``."""
        vocab = self.arch.vocab_size or vocab_size
        if not vocab:
            raise ConfigError("model.arch.vocab_size is 0 (from the tokenizer) but no tokenizer vocabulary size was "
                              "given; set model.arch.vocab_size or a tokenizer")
        return self.arch.replace(vocab_size=vocab, dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat,
                                 attention_impl=self.attention_impl, attention_chunk=self.attention_chunk,
                                 loss_chunk_size=self.loss_chunk_size,
                                 bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


# ``ModelConfig`` fields that a training config sets outside ``model.arch``
_ARCH_SET_ELSEWHERE = ("dtype", "param_dtype", "remat", "attention_impl", "attention_chunk", "loss_chunk_size",
                       "bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data (see ``ramjax.data``).

    train_files / eval_files: JSONL files (``source: jsonl``) or ArrayRecord files of JSON records (``grain``).
    format:      ``auto`` detects per file from the fields: ``proposal`` → proposal_samples (written by sample.py),
                 ``chosen``+``rejected`` → preference (TRL strings or message lists, HH-RLHF dialogues,
                 UltraFeedback-binarized), ``messages`` → chat, ``prompt``+``response``/``completion`` → sft,
                 ``text`` → text (pretraining). See ``ramjax.data`` for how each splits prompt and response.
    template:    how a ``prompt`` is rendered: ``plain`` (``"\\n\\nHuman: {prompt}\\n\\nAssistant: "``, the RAM
                 authors' template) or ``chat`` (the tokenizer's chat template).
    max_len:     tokens per row (prompt + response + EOS of one example, or of several when packing).
    max_prompt_len: prompts are cut from the left to this many tokens (BOS kept); responses are cut to fit
                 ``max_len``; an example left without a response token is skipped and counted.
    packing:     pack several examples per row (segment ids) instead of one right-padded example per row.
    padding:     how long unpacked rows are: ``max_len`` (every row ``max_len`` tokens) or ``longest`` (as long as
                 the longest example of the data set, rounded up to a multiple of 8 and at most ``max_len``: TRL's
                 ``longest`` padding, but per data set, so every step has one shape and compiles once). Packed
                 rows are always ``max_len`` long.
    batch_size:  global rows per step, over all hosts (each host gets batch_size / process_count).
    field_map:   renames source fields before parsing, e.g. ``{instruction: prompt, output: response}``.
    source:      ``jsonl``, ``hf`` (Hugging Face ``datasets``: local parquet/JSON/JSONL/CSV ``train_files`` and
                 ``eval_files``, or ``hf_path`` = a dataset directory or cached Hub dataset with ``hf_name`` and
                 ``split``), ``tfds`` (``tfds_name``, ``split``, ``tfds_data_dir``) or ``grain``; datasets, tfds and
                 grain are optional packages, imported only when used.
    """

    train_files: tuple[str, ...] = ()
    eval_files: tuple[str, ...] = ()
    format: DataFormat = "auto"
    template: Template = "plain"
    max_len: int = 512
    max_prompt_len: int = 256
    packing: bool = False
    padding: Literal["max_len", "longest"] = "max_len"
    batch_size: int = 64
    shuffle: bool = True
    field_map: dict[str, str] = dataclasses.field(default_factory=dict)
    source: Literal["jsonl", "hf", "tfds", "grain"] = "jsonl"
    hf_path: str | None = None
    hf_name: str | None = None
    tfds_name: str | None = None
    tfds_data_dir: str | None = None
    split: str = "train"

    def validate(self) -> None:
        _check(self.max_len > 1, f"data.max_len={self.max_len} must be > 1")
        _check(0 < self.max_prompt_len <= self.max_len,
               f"data.max_prompt_len={self.max_prompt_len} must be in [1, data.max_len={self.max_len}] (examples "
               f"whose prompt leaves no room for a response token are skipped and counted)")
        _check(self.batch_size > 0, f"data.batch_size={self.batch_size} must be positive")
        _check(not (self.packing and self.padding == "longest"),
               "data.padding=longest sizes unpacked rows to the data, but data.packing=true fills rows of "
               "data.max_len; set data.packing=false or data.padding=max_len")
        if self.source == "tfds":
            _check(bool(self.tfds_name), "data.source=tfds needs data.tfds_name (e.g. data.tfds_name=my_dataset)")
        if self.source == "hf":
            _check(bool(self.train_files) or bool(self.hf_path),
                   "data.source=hf needs data.train_files=[a.parquet,...] or data.hf_path=DATASET_DIR")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optax optimizer. The paper trains the aligner with RMSprop (lr 2e-7…1e-6) and clips gradients at norm 10.

    rms_decay is RMSprop's squared-gradient decay (PyTorch's ``alpha``, 0.99); momentum applies to rmsprop and
    sgd; b1/b2 to adamw. ``clip_norm: 0`` turns clipping off. ``grad_accum`` micro-batches per step split the
    global batch (which must be divisible by it).

    nonfinite: what a step whose loss or gradient norm is NaN/inf does. Either way its update is dropped on the
    device (the parameters and optimizer state stay those of the previous step, so no NaN is ever checkpointed or
    exported); ``stop`` then ends the run with ``NonFiniteTrainingError`` naming the step, ``skip`` carries on and
    stops only after more than ``max_skipped_steps`` such steps in the whole run (resumes included).
    """

    name: Literal["adamw", "rmsprop", "sgd"] = "adamw"
    lr: float = 1e-5
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    rms_decay: float = 0.99
    momentum: float = 0.0
    clip_norm: float = 10.0
    grad_accum: int = 1
    nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 10

    def validate(self) -> None:
        _check(self.max_skipped_steps >= 0, f"optimizer.max_skipped_steps={self.max_skipped_steps} must be >= 0")
        _check(self.lr >= 0, f"optimizer.lr={self.lr} must be >= 0")
        _check(self.weight_decay >= 0, f"optimizer.weight_decay={self.weight_decay} must be >= 0")
        _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"optimizer.b1={self.b1}, b2={self.b2} must be in [0, 1)")
        _check(0 <= self.rms_decay < 1, f"optimizer.rms_decay={self.rms_decay} must be in [0, 1)")
        _check(self.eps > 0, f"optimizer.eps={self.eps} must be positive")
        _check(self.momentum >= 0, f"optimizer.momentum={self.momentum} must be >= 0")
        _check(self.clip_norm >= 0, f"optimizer.clip_norm={self.clip_norm} must be >= 0 (0 = off)")
        _check(self.grad_accum >= 1, f"optimizer.grad_accum={self.grad_accum} must be >= 1")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule: linear warm-up from 0, then ``decay`` to ``final_lr_ratio``·lr at the last step.

    ``warmup_steps > 0`` overrides ``warmup_ratio`` (fraction of total steps; the paper uses 10%).
    """

    warmup_ratio: float = 0.1
    warmup_steps: int = 0
    decay: Literal["constant", "linear", "cosine"] = "linear"
    final_lr_ratio: float = 0.0

    def validate(self) -> None:
        _check(0 <= self.warmup_ratio <= 1, f"schedule.warmup_ratio={self.warmup_ratio} must be in [0, 1]")
        _check(self.warmup_steps >= 0, f"schedule.warmup_steps={self.warmup_steps} must be >= 0")
        _check(0 <= self.final_lr_ratio <= 1, f"schedule.final_lr_ratio={self.final_lr_ratio} must be in [0, 1]")


_MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Device mesh ``(data, fsdp, tensor)``; ``-1`` on one axis takes all remaining devices.

    rules: overrides of logical-axis rules (``ramjax.sharding.DEFAULT_RULES``), e.g. ``{vocab: null}`` to replicate
    the vocabulary or ``{act_batch: [data, fsdp]}``; names not given keep their defaults.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: dict[str, str | tuple[str, ...] | None] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        _check(all(s > 0 or s == -1 for s in sizes), f"mesh sizes must be positive or -1, got {sizes}")
        _check(sum(s == -1 for s in sizes) <= 1, f"mesh: at most one axis may be -1, got {sizes}")
        from ramjax.sharding import DEFAULT_RULES

        known = [name for name, _ in DEFAULT_RULES]
        for name, target in self.rules.items():
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"mesh.rules: unknown logical axis {name!r}{hint} Known: {', '.join(known)}")
            targets = (target,) if isinstance(target, str) else tuple(target or ())
            for t in targets:
                _check(t in _MESH_AXES, f"mesh.rules.{name}: {t!r} is not a mesh axis; use one of {_MESH_AXES}")

    def mesh_config(self):
        """The ``ramjax.sharding.MeshConfig`` of this section."""
        from ramjax.sharding import MeshConfig

        return MeshConfig(data=self.data, fsdp=self.fsdp, tensor=self.tensor)

    def sharding_rules(self) -> tuple[tuple[str, Any], ...]:
        """``DEFAULT_RULES`` with this section's overrides applied (same order)."""
        from ramjax.sharding import DEFAULT_RULES

        return tuple((name, self.rules.get(name, target) if name in self.rules else target)
                     for name, target in DEFAULT_RULES)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in ``run_dir/checkpoints``: every N steps (0 = only at the end), keep the last ``keep``;
    ``resume`` continues from the latest one; ``export_hf`` writes ``run_dir/hf`` when the model came from HF.
    ``async_save`` writes checkpoints in a background thread while training continues (the next save, the end of
    the run and a preemption wait for it)."""

    every: int = 1000
    keep: int = 3
    resume: bool = True
    export_hf: bool = True
    async_save: bool = False

    def validate(self) -> None:
        _check(self.every >= 0, f"checkpoint.every={self.every} must be >= 0 (0 = only the final step)")
        _check(self.keep >= 1, f"checkpoint.keep={self.keep} must be >= 1")


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """Metrics every N steps to ``run_dir/metrics.jsonl`` (+ TensorBoard in ``run_dir/tb``), process 0 only.

    eval_every: with ``data.eval_files``, the held-out objective (``eval/loss``, the objective's other metrics,
                ``eval/tokens``) is computed on every eval example every this many steps and at the last step
                (0: at the last step only).
    """

    every: int = 10
    eval_every: int = 100
    tensorboard: bool = True
    progress: bool = True

    def validate(self) -> None:
        _check(self.every >= 1, f"logging.every={self.every} must be >= 1")
        _check(self.eval_every >= 0, f"logging.eval_every={self.eval_every} must be >= 0 (0: evaluate the "
                                     f"data.eval_files at the last step only)")


@dataclasses.dataclass(frozen=True)
class RamConfig:
    """The RAM aligner loss ``-log Q(y_data|x) + alpha · log Q(y_neg|x)`` (sums over response tokens).

    alpha:      weight of the negative term; 1e-4 in the paper (ablated 1e-5…1e-1). The term is unbounded below,
                so alpha must be >= 0 and small.
    negatives:  where y_neg comes from: ``proposal`` (the one-time P_M sample written by sample.py, field
                ``proposal``) or ``rejected`` (the ``rejected`` response of preference data).
    """

    alpha: float = 1e-4
    negatives: Literal["proposal", "rejected"] = "proposal"

    def validate(self) -> None:
        loss_lib.validate_alpha(self.alpha)


@dataclasses.dataclass(frozen=True)
class DpoConfig:
    """DPO baseline: ``beta`` (TRL default 0.1), conservative-DPO ``label_smoothing`` in [0, 0.5), and
    ``rpo_alpha`` (TRL's name; RPO, Pang et al. 2024): weight of a token-mean NLL on the chosen responses added to
    the DPO loss, which keeps DPO from pushing the chosen responses' likelihood down with the rejected ones
    (0 = plain DPO; RPO uses 1)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0

    def validate(self) -> None:
        loss_lib.validate_dpo(self.beta, self.label_smoothing, self.rpo_alpha)


@dataclasses.dataclass(frozen=True)
class TrraConfig:
    """Training-time realignment: the teacher is softmax((lam·h_aligned + (1-lam)·h_reference) / temperature).

    lam > 1 extrapolates past the aligned model (paper: 0.5 … 10); any real value is allowed. ``direction``:
    ``forward`` = KL(teacher ‖ student), ``reverse`` = KL(student ‖ teacher). ``reference`` and ``aligned`` are
    model directories (ramjax or Hugging Face) sharing the student's vocabulary; the student starts from
    ``model.init`` (normally the reference). ``iterations > 1`` is iterated TrRa: round r trains a fresh student
    (from ``model.init``) in ``run_dir/round_r`` against the teacher whose aligned model is round r−1's student.
    ``teacher_topk = k > 0`` computes the teacher once before training, stored per response position as its top k
    tokens plus the mass of the rest (``run_dir/trra_teacher.npz``, host memory), and trains against that: the two
    teacher models leave the devices before the first step (needs ``data.packing: false``).
    """

    lam: float = 2.0
    direction: Literal["forward", "reverse"] = "forward"
    temperature: float = 1.0
    reference: str | None = None
    aligned: str | None = None
    iterations: int = 1
    teacher_topk: int = 0

    def validate(self) -> None:
        _check(self.temperature > 0, f"trra.temperature={self.temperature} must be positive")
        _check(self.teacher_topk >= 0, f"trra.teacher_topk={self.teacher_topk} must be >= 0 (0 = the full teacher "
                                       f"every step)")
        _check(self.lam == self.lam and abs(self.lam) != float("inf"), f"trra.lam={self.lam} must be finite")
        _check(self.iterations >= 1, f"trra.iterations={self.iterations} must be >= 1 (1 = plain TrRa)")


@dataclasses.dataclass(frozen=True)
class InraConfig:
    """Inference-time realignment: train only an InRa adapter layer (any stage but pretrain).

    With ``enabled``, a copy of the bottom decoder layer with zeroed attention-output and MLP-down projections is
    inserted below layer 0 of ``model.init`` (so training starts from the identity) and only it trains; the
    optimizer state exists for the adapter alone. ``adapter_init``: an adapter file (``run_dir/adapter.safetensors``
    of an earlier run) to start from instead. The run writes ``run_dir/adapter.safetensors`` and the L+1-layer
    model as ``run_dir/model`` (and ``run_dir/hf``); sample it with ``mode=inra``.
    """

    enabled: bool = False
    adapter_init: str | None = None


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process runs: ``jax.distributed.initialize(coordinator_address, num_processes, process_id)``.

    enabled: null (default) starts the distributed runtime when the environment shows several processes (a
    multi-host TPU slice, SLURM with several tasks, Open MPI, or ``JAX_COORDINATOR_ADDRESS``; see
    ``ramjax.distributed``); true always; false never (one process). Leave the three settings null to let JAX
    detect them (TPU pods, SLURM) or to take ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``.
    """

    enabled: bool | None = None
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def validate(self) -> None:
        if self.num_processes is not None:
            _check(self.num_processes >= 1, f"distributed.num_processes={self.num_processes} must be >= 1")
            if self.process_id is not None:
                _check(0 <= self.process_id < self.num_processes,
                       f"distributed.process_id={self.process_id} must be in [0, {self.num_processes})")


# which data formats each stage can read (besides ``auto``)
_STAGE_FORMATS = {
    "pretrain": ("text", "sft", "chat", "preference", "proposal_samples"),
    "sft": ("sft", "chat", "preference", "proposal_samples", "text"),
    "trra": ("sft", "chat", "preference", "proposal_samples"),
    "dpo": ("preference",),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One run of ``train.py``.

    stage:    ``pretrain`` (next-token loss on text), ``sft`` (responses only; the P_M warm-up and the SFT
              baseline), ``dpo`` (baseline), ``ram`` (the residual aligner Q_θ), ``trra`` (training-time
              realignment).
    run_dir:  everything the run writes: config.yaml, metrics.jsonl, tb/, checkpoints/, hf/.
    steps:    optimizer steps; 0 = ``tokens`` (rows × max_len per step) when set, else ``epochs`` passes over the
              data.
    tokenizer: tokenizer path (directory or file); null = the model's own (required for ``model.init: scratch``).
    proposal: stage ram only: the proposal model directory, read only to check that vocabularies match.
    """

    program: Literal["train"] = "train"
    stage: Stage = "sft"
    run_dir: str = "runs/default"
    seed: int = 0
    steps: int = 0
    epochs: float = 1.0
    tokens: int = 0
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    tokenizer: str | None = None
    proposal: str | None = None
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    ram: RamConfig = dataclasses.field(default_factory=RamConfig)
    dpo: DpoConfig = dataclasses.field(default_factory=DpoConfig)
    trra: TrraConfig = dataclasses.field(default_factory=TrraConfig)
    inra: InraConfig = dataclasses.field(default_factory=InraConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    def validate(self) -> None:
        _check(self.steps >= 0, f"steps={self.steps} must be >= 0 (0 = from epochs)")
        _check(self.steps > 0 or self.tokens > 0 or self.epochs > 0,
               f"steps=0 and tokens=0 need epochs > 0, got epochs={self.epochs}")
        _check(self.tokens >= 0, f"tokens={self.tokens} must be >= 0 (0 = from epochs)")
        _check(bool(self.run_dir.strip()), "run_dir is empty")
        _check(self.data.batch_size % self.optimizer.grad_accum == 0,
               f"data.batch_size={self.data.batch_size} must be divisible by "
               f"optimizer.grad_accum={self.optimizer.grad_accum}")
        if self.model.from_scratch:
            _check(self.tokenizer is not None,
                   "model.init=scratch has no tokenizer of its own; set tokenizer=PATH (a tokenizer directory or file)")
            _check(self.model.arch.max_position_embeddings >= self.data.max_len,
                   f"model.arch.max_position_embeddings={self.model.arch.max_position_embeddings} is smaller than "
                   f"data.max_len={self.data.max_len}")
        fmt = self.data.format
        if fmt != "auto":
            if self.stage == "ram":
                want = "proposal_samples" if self.ram.negatives == "proposal" else "preference"
                _check(fmt == want, f"stage=ram with ram.negatives={self.ram.negatives} reads data.format={want!r}, "
                                    f"not {fmt!r}" + ("; for preference data set ram.negatives=rejected"
                                                      if fmt == "preference" else ""))
            else:
                _check(fmt in _STAGE_FORMATS[self.stage],
                       f"stage={self.stage} cannot train on data.format={fmt!r}; use one of "
                       f"{', '.join(_STAGE_FORMATS[self.stage])} or auto")
        if self.stage == "trra":
            _check(self.trra.reference is not None and self.trra.aligned is not None,
                   "stage=trra needs trra.reference and trra.aligned (model directories)")
        if self.inra.enabled:
            _check(self.stage != "pretrain", "inra.enabled trains an adapter on top of a trained model; use it with "
                                             "stage=sft, dpo, ram or trra, not pretrain")
            _check(not self.model.from_scratch, "inra.enabled needs model.init=PATH (the model the adapter "
                                                "realigns), not scratch")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """``python train.py configs/tokenizer.yaml``: a sentencepiece BPE trained on JSONL files (any data format).

    files: the corpus (text records as is; prompt/response records in the plain dialogue template).
    out_dir: where tokenizer.model + tokenizer_config.json go (pass it as ``tokenizer=`` to the stage configs).
    vocab_size: pieces; 0 = sized from the corpus (``ramjax.tokenizer.auto_vocab_size``).
    """

    program: Literal["tokenizer"] = "tokenizer"
    files: tuple[str, ...] = ()
    out_dir: str = "runs/tokenizer"
    vocab_size: int = 0
    seed: int = 0
    format: str = "auto"

    def validate(self) -> None:
        _check(bool(self.files), "files is empty; set files=[corpus.jsonl,...]")
        _check(self.vocab_size == 0 or self.vocab_size > 260,
               f"vocab_size={self.vocab_size}: 0 (from the corpus) or > 260 (4 special ids and 256 bytes come first)")


# ------------------------------------------------------------------------------------------------------------
# The schema of sample.py


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """One run of ``sample.py``: the aligned model P_M·Q_θ (or either alone) sampled token by token.

    proposal, aligner: model directories (HF or ramjax checkpoints); mode ``inra``: ``proposal`` is the base model
                 and ``adapter`` the adapter file of an ``inra.enabled`` training run.
    sampling:    a ``ramjax.SamplingParams`` (``ramjax.sampling_params``, the one home of every sampling setting and
                 its default): mode (``proposal`` — P_M alone, also how the one-time RAM training samples are drawn —
                 ``aligner``, ``par``, ``sparse``, ``product``, ``inra``), n, max_new_tokens, temperatures, top-p/top-k,
                 repetition penalty, KL threshold and fallback, product support, stop strings, greedy, InRa λ,
                 template, decode dtype, ``num_speculative_tokens`` (k > 0: exact speculative decoding, the aligner
                 drafts k tokens per round and P_M verifies them in one forward). Its defaults are the authors'
                 released settings (proposal T 0.5 / top-p 0.95, aligner T 0.5 / top-p 0.9, penalty 1.05, KL monitor
                 0.1, up to 1024 new tokens); the authors drew their one-time training samples with the ``release``
                 preset (top-k 10), the pipeline with ``sampled`` (T 1).
                 ``sample.py`` also accepts the bare field names (``mode=sparse`` = ``sampling.mode=sparse``) and
                 ``lambda=`` for ``sampling.inra_lambda=``.
    lambda_field: mode ``inra``: a prompt record with this field uses its own λ (else ``sampling.inra_lambda``).
    output_file:  JSONL (one line per sample); alpaca_output: AlpacaEval JSON (instruction, output, generator).
    mesh:        the mesh of each process's own devices: with several processes (``distributed``, detected on TPU
                 pods and SLURM) every process holds the models and samples its share of the prompts; process 0
                 writes the one, ordered output.
    aligner_tokenizer: ``own`` (the aligner directory must hold its tokenizer files; its vocabulary is checked
                 against the proposal's) or ``proposal`` (an aligner saved without tokenizer files uses the
                 proposal's, with a warning: only when you know it was trained with that tokenizer).
    """

    proposal: str = ""
    aligner: str | None = None
    adapter: str | None = None
    prompts_file: str = ""
    output_file: str = "samples.jsonl"
    alpaca_output: str | None = None
    # SamplingParams' defaults, except the released code's 1024 new tokens at most (the library's own default, 64,
    # suits tests and the pipeline's short tasks; sample.py users expect the release's length)
    sampling: SamplingParams = dataclasses.field(default_factory=lambda: SamplingParams(max_new_tokens=1024))
    lambda_field: str = "lambda"
    num_samples: int = 1
    seed: int = 0
    batch_size: int = 8
    generator: str = "ramjax"
    aligner_tokenizer: Literal["own", "proposal"] = "own"
    mesh: MeshSection = dataclasses.field(default_factory=lambda: MeshSection(data=-1, fsdp=1, tensor=1))
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    def validate(self) -> None:
        # the sampling section validates itself (SamplingParams.validate, run first by validate_config)
        _check(bool(self.proposal), "proposal is empty; set proposal=PATH (a HF directory or ramjax checkpoint)")
        _check(bool(self.prompts_file), "prompts_file is empty; set prompts_file=PATH (JSONL with prompt/messages/"
                                        "instruction)")
        mode = self.sampling.mode
        if mode not in ("proposal", "inra"):
            _check(self.aligner is not None, f"sampling.mode={mode} needs aligner=PATH")
        if mode == "inra":
            _check(self.adapter is not None, "mode=inra needs adapter=PATH (the adapter.safetensors of an "
                                             "inra.enabled training run) and proposal=PATH (its base model)")
        _check(self.num_samples >= 1, f"num_samples={self.num_samples} must be >= 1")
        _check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
