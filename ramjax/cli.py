"""The command lines: ``ramjax-train`` (``python train.py``) and ``ramjax-sample`` (``python sample.py``); they
parse, print and call the library; ``ramjax-eval`` (``python -m ramjax.evaluate``) wraps ``ramjax.evaluate.main``.
``TRAIN_USAGE`` and ``SAMPLE_USAGE`` are their help texts.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Callable  # noqa: F401 -- used in annotations

from ramjax import hostmem

TRAINING_FLAG = "--training-data"

TRAIN_USAGE = """Train a model: ``python train.py (or ramjax-train) [CONFIG.yaml] [key=value ...] [--dry-run]``.

Stages (``stage=`` in the config): ``pretrain``, ``sft`` (P_M warm-up / SFT baseline), ``dpo`` (baseline),
``ram`` (the residual aligner Q_θ) and ``trra`` (training-time realignment; ``trra.iterations`` for iterated TrRa).
``inra.enabled=true`` trains only an InRa adapter layer with the stage's objective. The CLI only parses, prints
and calls ``ramjax.train_lib``:

    python train.py configs/ram.yaml optimizer.lr=1e-6 ram.alpha=1e-3 mesh.fsdp=8
    python train.py configs/sft.yaml --dry-run     # validate, build shapes, print sizes and compiled memory

Every config file says which program it runs with a top-level ``program:`` key: ``train`` (one stage; the
default when the key is absent), ``pipeline`` (``configs/default.yaml``: the whole embedded-default pipeline,
``ramjax.experiments.pipeline``) or ``ablate`` (``configs/ablate.yaml``: the α × aligner-size sweep,
``ramjax.experiments.ablate``). With no arguments, or only ``key=value`` overrides without ``stage=``, it runs
``configs/default.yaml`` if that file exists, else prints this help.
A run (a training run or the whole pipeline) owns its ``run_dir``: a second run on it at the same time exits 2
naming the holder, and a run directory made with other settings is refused (naming the keys) unless
``--force-restart`` is given, which moves the old run to ``<run_dir>.replaced-<time>`` and starts over.
Exit status: 0 on success and after a SIGTERM/SIGINT checkpoint, 2 on a configuration/input error.
"""

SAMPLE_USAGE = """Sample the aligned model P_M·Q_θ (or either model alone) over a JSONL file of prompts.

    python sample.py (or ramjax-sample) configs/sample.yaml [key=value ...] [--training-data]

Keys are those of ``ramjax.config.SampleConfig`` (``proposal``, ``aligner``, ``prompts_file``, ``output_file``,
``alpaca_output``, ``seed``, ``num_samples``, ``batch_size`` ...) and its ``sampling:`` section, a
``ramjax.SamplingParams`` (``mode``, ``n``, ``max_new_tokens``, temperatures, top-p/top-k, ``kl_threshold``, ``stop``
...). A sampling field may be given bare: ``mode=sparse`` means ``sampling.mode=sparse``.

Outputs (see ``ramjax.generate``): a JSONL with one line per sample (prompt, text, token ids, finish reason, length,
KL-fallback rate, ESS) and, with ``alpaca_output``, an AlpacaEval JSON (instruction, output, generator).
``--training-data`` instead writes every input example with the sample in field ``proposal`` — the one-time P_M
samples the ``ram`` stage trains on, e.g.::

    python sample.py configs/sample.yaml --training-data mode=proposal top_k=10 \\
        prompts_file=data/train.jsonl output_file=data/train_proposal.jsonl

InRa (an adapter trained with ``inra.enabled=true``): ``proposal`` is the base model, ``adapter`` the adapter file,
``lambda=`` the mixing weight for every prompt (a prompt record's own ``lambda`` field wins; each output line
records its λ)::

    python sample.py configs/sample.yaml mode=inra proposal=runs/sft/model adapter=runs/inra/adapter.safetensors \\
        lambda=0.5 prompts_file=data/eval.jsonl output_file=samples_inra.jsonl

Both resume where an interrupted run stopped (no duplicates, no lost rows). Several processes (a TPU pod: the
same command on every worker; SLURM: ``srun``; or ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` on each process) each sample their share of the prompts on their own devices, and process 0
writes the one output, identical to a one-process run's. The script only parses, loads and calls
``ramjax.generate.generate_jsonl``.
"""


def _default_config() -> str | None:
    """``configs/default.yaml`` of the source tree (a checkout or an editable install), else of the current
    directory, else None."""
    for root in (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.getcwd()):
        path = os.path.join(root, "configs", "default.yaml")
        if os.path.isfile(path):
            return path
    return None


def _usage() -> str:
    return TRAIN_USAGE.strip()


def _bar(total: int, initial: int, enabled: bool):
    """A tqdm progress callback showing loss and tokens/s (process 0 only)."""
    if not enabled:
        return None, None
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train")

    def progress(event):
        bar.update(event["step"] - bar.n)
        m = event.get("metrics")
        if m:
            post = {"loss": f"{m.get('train/loss', float('nan')):.4f}",
                    "tok/s": f"{m.get('perf/tokens_per_s', 0.0):.0f}"}
            if "train/nll_data" in m:
                post["nll"] = f"{m['train/nll_data']:.3f}"
            bar.set_postfix(post, refresh=False)

    return progress, bar


PROGRAMS = ("train", "pipeline", "ablate", "tokenizer")


def _program(path: str | None, overrides: list[str]) -> str:
    """The program a config file declares (its top-level ``program:`` key, after ``include:`` files are merged;
    ``train`` when absent), or a ``program=`` override. Raises ``ConfigError`` for an unknown program."""
    from ramjax import config as config_lib

    declared = config_lib.read_yaml(path).get("program", "train") if path is not None else "train"
    for o in overrides:
        if o.startswith("program="):
            declared = o[len("program="):]
    if declared not in PROGRAMS:
        raise config_lib.ConfigError(f"program: {declared!r} in {path or 'the overrides'} is not one of "
                                     f"{', '.join(PROGRAMS)}")
    return declared


def _run_tokenizer(path: str, overrides: list[str], dry: bool) -> int:
    """``program: tokenizer`` (configs/tokenizer.yaml): a sentencepiece tokenizer trained on JSONL files."""
    from ramjax import config as config_lib
    from ramjax import tokenizer as tok_lib

    cfg = config_lib.load_config(config_lib.TokenizerConfig, path, overrides)
    print(config_lib.format_config(cfg), flush=True)
    if dry:
        return 0
    try:
        tok = tok_lib.train_tokenizer_on_files(list(cfg.files), cfg.out_dir, vocab_size=cfg.vocab_size, seed=cfg.seed,
                                               format=cfg.format)
    except ValueError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(f"tokenizer: {cfg.out_dir} ({tok.vocab_size} pieces)")
    return 0


def _run_pipeline(path: str, overrides: list[str], dry: bool, force_restart: bool = False) -> int:
    from ramjax import config as config_lib
    from ramjax.experiments import pipeline

    try:
        run = config_lib.load_config(pipeline.DefaultRunConfig, path, overrides)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(config_lib.format_config(run), flush=True)
    if dry:
        return 0

    bars: dict = {}

    def on_stage(name, event, seconds):
        if name in bars:
            bars.pop(name).close()
        print(f"[pipeline] {name}: {event}" + (f" ({seconds:.1f} s)" if seconds is not None else ""), flush=True)

    def train_progress(name, info):
        from tqdm import tqdm

        if name not in bars:
            bars[name] = tqdm(total=info.get("total_steps"), desc=name, dynamic_ncols=True, leave=False)
        bar = bars[name]
        bar.update(info["step"] - bar.n)
        m = info.get("metrics")
        if m and "train/loss" in m:
            bar.set_postfix({"loss": f"{m['train/loss']:.4f}"}, refresh=False)

    try:
        out = pipeline.run_pipeline(run, on_stage=on_stage, train_progress=train_progress,
                                    force_restart=force_restart)
    except (ValueError, OSError) as e:  # named input errors; OSError: a path that cannot be read or written
        return error_exit(e)
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 0
    if out.get("table"):
        print(out["table"])
    if out.get("stage_times"):
        print("\ntime per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in out["stage_times"].items())
              + f"; total {sum(out['stage_times'].values()):.0f}")
    print(f"report: {out.get('report')}")
    return 0


def train_main(argv: list[str] | None = None) -> int:
    """``ramjax-train`` / ``python train.py``: see ``TRAIN_USAGE``; returns the exit status."""
    if argv is None:  # run as a program (not called in-process): see ramjax.hostmem
        hostmem.maybe_reexec()
    argv = list(sys.argv[1:] if argv is None else argv)
    default_config = _default_config()
    if any(a in ("-h", "--help") for a in argv):
        print(_usage())
        return 0
    dry = "--dry-run" in argv
    force_restart = "--force-restart" in argv
    argv = [a for a in argv if a not in ("--dry-run", "--force-restart")]
    if not argv and not dry:
        if default_config is None:
            print(_usage())
            return 0
        argv = [default_config]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every array it writes at INFO

    from ramjax import config as config_lib

    try:
        path, overrides = config_lib.split_cli_args(argv)
        if path is None and default_config is not None and not any(o.startswith("stage=") for o in overrides):
            path = default_config  # `python train.py run_dir=... pipeline.alpha=...` overrides the default pipeline
        program = _program(path, overrides)
        if force_restart and program not in ("train", "pipeline"):
            raise config_lib.ConfigError(f"--force-restart applies to training runs and the pipeline, not to "
                                         f"program: {program}")
        if program == "pipeline":
            return _run_pipeline(path, overrides, dry, force_restart)
        if program == "tokenizer":
            return _run_tokenizer(path, overrides, dry)
        if program == "ablate":
            if dry:
                raise config_lib.ConfigError("--dry-run checks one training config; the ablation sweep has none")
            from ramjax.experiments import ablate

            return guarded(ablate.main, [path, *overrides])
        cfg = config_lib.load_config(config_lib.TrainConfig, path, overrides)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from ramjax import train_lib

    # The distributed runtime must start before JAX touches a device (printing the resolved config does not).
    if (code := _start_distributed(cfg.distributed)) is not None:
        return code
    import jax

    primary = jax.process_index() == 0
    if primary:
        print(config_lib.format_config(cfg), flush=True)
    try:
        if dry:
            info = train_lib.dry_run(cfg)
            if primary:
                from ramjax import memplan

                mem = info.pop("memory")
                plan = info.pop("plan", None)
                print(json.dumps(info, indent=2, default=str))
                print(f"parameters: {info['num_params']:,}")
                if mem:
                    print("compiled train step per device: " + ", ".join(
                        f"{k.replace('_in_bytes', '').replace('_bytes', '')} {v / 2**20:.1f} MiB"
                        for k, v in mem.items()))
                if plan:
                    print(memplan.format_report(plan))
                    print("PLAN_JSON " + json.dumps(plan))
            return 0
        progress = None
        if primary and cfg.logging.progress:
            state = {"bar": None}

            def progress(event):  # the bar is created on the first event, once the total and start step are known
                if state["bar"] is None:
                    state["cb"], state["bar"] = _bar(event["total_steps"], event["step"] - 1, True)
                state["cb"](event)

        result = train_lib.train(cfg, progress=progress, force_restart=force_restart)
        if progress is not None and state["bar"] is not None:
            state["bar"].close()
    except (ValueError, OSError) as e:  # every input error in ramjax is a named ValueError subclass; OSError: a
        return error_exit(e)            # path that cannot be read or written
    if primary:
        what = "interrupted; checkpoint saved at" if result.interrupted else "finished at"
        print(f"{what} step {result.step}/{result.total_steps}; run directory {result.run_dir}")
        if result.model_dir:
            print(f"model: {result.model_dir}" + (f"  (Hugging Face: {result.hf_dir})" if result.hf_dir else ""))
    return 0

def _sampling_key(arg: str) -> str:
    """``mode=sparse`` -> ``sampling.mode=sparse`` for the fields of ``SamplingParams`` (the config's ``sampling:``
    section), ``lambda=0.5`` -> ``sampling.inra_lambda=0.5`` (``lambda`` is a Python keyword); other arguments as
    given."""
    from ramjax.sampling_params import FIELDS

    if "=" not in arg:
        return arg
    key, value = arg.split("=", 1)
    key = "inra_lambda" if key == "lambda" else key
    return f"sampling.{key}={value}" if key in FIELDS else arg


def sample_main(argv: list[str] | None = None) -> int:
    """``ramjax-sample`` / ``python sample.py``: see ``SAMPLE_USAGE``; returns the exit status."""
    if argv is None:  # run as a program (not called in-process): see ramjax.hostmem
        hostmem.maybe_reexec()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(SAMPLE_USAGE)
        return 0 if argv else 2
    training = TRAINING_FLAG in argv
    argv = [a for a in argv if a != TRAINING_FLAG]
    argv = [_sampling_key(a) for a in argv]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)

    from ramjax import config as config_lib

    try:
        path, overrides = config_lib.split_cli_args(argv)
        cfg = config_lib.load_config(config_lib.SampleConfig, path, overrides)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    output = "training" if training else "samples"  # SampleConfig has no output key: the flag decides

    if (code := _start_distributed(cfg.distributed)) is not None:  # before anything touches a device
        return code
    import jax

    from ramjax import api, generate
    from ramjax import sharding as shd

    primary = jax.process_index() == 0
    if primary:
        print(config_lib.format_config(cfg), flush=True)
    try:
        # each process samples its share of the prompts on its own devices (see ramjax.generate)
        mesh = shd.make_mesh(cfg.mesh.mesh_config(), devices=jax.local_devices())
        rules = cfg.mesh.sharding_rules()
        sp = cfg.sampling
        if sp.mode == "inra":
            from ramjax import inra

            proposal, aligner = inra.load_inra_model(cfg.proposal, cfg.adapter, mesh=mesh, rules=rules), None
        else:
            proposal = api.load_model(cfg.proposal, mesh=mesh, rules=rules) if sp.mode != "aligner" else None
            aligner = api.load_model(cfg.aligner, mesh=mesh, rules=rules) if sp.mode != "proposal" else None
            if aligner is not None and proposal is not None and aligner.tokenizer is None \
                    and cfg.aligner_tokenizer == "proposal":
                import dataclasses

                logging.getLogger("ramjax.cli").warning(
                    "aligner %s has no tokenizer files: using the proposal's (aligner_tokenizer=proposal); its "
                    "vocabulary is NOT checked", cfg.aligner)
                aligner = dataclasses.replace(aligner, tokenizer=proposal.tokenizer, vocab_limit=0)
        bar = None

        def progress(done: int, total: int) -> None:
            nonlocal bar
            if not primary:
                return
            if bar is None:
                from tqdm import tqdm

                bar = tqdm(total=total, initial=done, dynamic_ncols=True, desc=f"sample ({sp.mode})",
                           unit="prompt")
            bar.update(done - bar.n)

        summary = generate.generate_jsonl(
            proposal, aligner, cfg.prompts_file, cfg.output_file, sp, output=output, batch_size=cfg.batch_size,
            num_samples=cfg.num_samples, seed=cfg.seed, alpaca_output=cfg.alpaca_output, generator=cfg.generator,
            progress=progress, rules=rules, lambda_field=cfg.lambda_field)
        if bar is not None:
            bar.close()
    except (ValueError, OSError) as e:  # every input error in ramjax is a named ValueError subclass; OSError: a
        return error_exit(e)            # path that cannot be read or written
    if primary:
        print(f"wrote {summary.written} examples to {summary.output_file} ({summary.skipped} were already there, "
              f"{summary.total} in all)" + (f"; AlpacaEval file {summary.alpaca_output}" if summary.alpaca_output
                                            else ""))
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    """``ramjax-eval`` / ``python -m ramjax.evaluate [CONFIG.yaml] [key=value ...]``: judges systems
    (``ramjax.evaluate.main``) with ``--help`` and named errors as in the other commands."""
    if argv is None:  # run as a program (not called in-process): see ramjax.hostmem
        hostmem.maybe_reexec()
    argv = list(sys.argv[1:] if argv is None else argv)
    from ramjax import evaluate

    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: ramjax-eval [CONFIG.yaml] [key=value ...]  (python -m ramjax.evaluate)\n\n{evaluate.__doc__}")
        return 0 if argv else 2
    return guarded(evaluate.main, argv)


def ablate_main(argv: list[str] | None = None) -> int:
    """``python -m ramjax.experiments.ablate [CONFIG.yaml] [key=value ...]``: the α × aligner-size sweep, with
    ``--help`` and named errors as in the other commands."""
    if argv is None:  # run as a program (not called in-process): see ramjax.hostmem
        hostmem.maybe_reexec()
    from ramjax.experiments import ablate

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: python -m ramjax.experiments.ablate [CONFIG.yaml] [key=value ...]\n\n{ablate.__doc__}")
        return 0
    return guarded(ablate.main, argv)


def sweep_main(argv: list[str] | None = None) -> int:
    """``python -m ramjax.experiments.realign_sweep [CONFIG.yaml] [key=value ...]`` with ``--help`` and named errors."""
    if argv is None:  # run as a program (not called in-process): see ramjax.hostmem
        hostmem.maybe_reexec()
    from ramjax.experiments import realign_sweep

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        usage = "usage: python -m ramjax.experiments.realign_sweep [CONFIG.yaml] [key=value ...]"
        print(f"{usage}\n\n{realign_sweep.__doc__}")
        return 0
    return guarded(realign_sweep.main, argv)


def _start_distributed(dist) -> int | None:
    """Starts the multi-process runtime for a ``DistributedConfig`` (auto by default: a TPU slice, SLURM, Open MPI,
    ``JAX_COORDINATOR_ADDRESS``...; or ``distributed.*``); None when it started or is not needed, else the exit
    status after a one-line error (half-given settings are a ``DistributedError``)."""
    from ramjax import distributed

    try:
        distributed.initialize(dist)
    except ValueError as e:  # DistributedError, or a bad address/port from jax.distributed
        return error_exit(e)
    return None


def error_exit(e: BaseException) -> int:
    """Prints one line for a named error (a ``ConfigError`` as its message, others with their class name) to
    stderr and returns exit status 2."""
    from ramjax.config import ConfigError

    text = " ".join(str(e).split()) if not isinstance(e, ConfigError) else str(e)
    print(f"error: {text}" if isinstance(e, ConfigError) else f"error: {type(e).__name__}: {text}", file=sys.stderr)
    return 2


def guarded(main: "Callable[[list[str]], int]", argv: list[str]) -> int:
    """``main(argv)`` with every named input error (``ValueError`` subclasses, ``ConfigError`` included) and
    unreadable/unwritable path (``OSError``) reported as one line and exit status 2, as ``train.py`` does."""
    try:
        return main(argv)
    except (ValueError, OSError) as e:
        return error_exit(e)
