"""Sample the aligned model P_M·Q_θ (or either model alone) over a JSONL file of prompts.

    python sample.py configs/sample.yaml [key=value ...] [--training-data]

Keys are those of ``ramjax.config.SampleConfig`` (``proposal``, ``aligner``, ``prompts_file``, ``output_file``,
``alpaca_output``, ``mode``, ``n``, temperatures, top-p, ``kl_threshold``, ``stop``, ``seed``, ``num_samples`` ...).

Outputs (see ``ramjax.generate``): a JSONL with one line per sample (prompt, text, token ids, finish reason, length,
KL-fallback rate, ESS) and, with ``alpaca_output``, an AlpacaEval JSON (instruction, output, generator).
``--training-data`` instead writes every input example with the sample in field ``proposal`` — the one-time P_M
samples the ``ram`` stage trains on, e.g.::

    python sample.py configs/sample.yaml --training-data mode=proposal top_k=10 \\
        prompts_file=data/train.jsonl output_file=data/train_proposal.jsonl

InRa (an adapter trained with ``inra.enabled=true``): ``proposal`` is the base model, ``adapter`` the adapter file,
``lambda=`` the mixing weight for every prompt (a prompt record's own ``lambda`` field wins; each output line
records its λ)::

    python sample.py configs/sample.yaml mode=inra proposal=runs/sft/model adapter=runs/inra/adapter.safetensors \
        lambda=0.5 prompts_file=data/eval.jsonl output_file=samples_inra.jsonl

Both resume where an interrupted run stopped (no duplicates, no lost rows). The script only parses, loads and
calls ``ramjax.generate.generate_jsonl``.
"""
from __future__ import annotations

import logging
import sys

TRAINING_FLAG = "--training-data"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    training = TRAINING_FLAG in argv
    argv = [a for a in argv if a != TRAINING_FLAG]
    # ``lambda`` is a Python keyword, so the config field is ``inra_lambda``; accept the short name on the CLI
    argv = ["inra_lambda=" + a[len("lambda="):] if a.startswith("lambda=") else a for a in argv]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)

    from ramjax import config as config_lib

    try:
        path, overrides = config_lib.split_cli_args(argv)
        cfg = config_lib.load_config(config_lib.SampleConfig, path, overrides)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    output = getattr(cfg, "output_format", "samples")
    if training:
        output = "training"

    import jax

    from ramjax import api, generate
    from ramjax import sharding as shd

    primary = jax.process_index() == 0
    if primary:
        print(config_lib.format_config(cfg), flush=True)
    try:
        mesh = shd.make_mesh(cfg.mesh.mesh_config())
        rules = cfg.mesh.sharding_rules()
        if cfg.mode == "inra":
            from ramjax import realign

            proposal, aligner = realign.load_inra_model(cfg.proposal, cfg.adapter, mesh=mesh, rules=rules), None
        else:
            proposal = api.load_model(cfg.proposal, mesh=mesh, rules=rules) if cfg.mode != "aligner" else None
            aligner = api.load_model(cfg.aligner, mesh=mesh, rules=rules) if cfg.mode != "proposal" else None
        bar = None

        def progress(done: int, total: int) -> None:
            nonlocal bar
            if not primary:
                return
            if bar is None:
                from tqdm import tqdm

                bar = tqdm(total=total, initial=done, dynamic_ncols=True, desc=f"sample ({cfg.mode})",
                           unit="prompt")
            bar.update(done - bar.n)

        summary = generate.generate_jsonl(
            proposal, aligner, cfg.prompts_file, cfg.output_file, output=output, batch_size=cfg.batch_size,
            num_samples=cfg.num_samples, alpaca_output=cfg.alpaca_output, generator=cfg.generator,
            progress=progress, rules=rules, mode=cfg.mode, n=cfg.n, max_new_tokens=cfg.max_new_tokens,
            seed=cfg.seed, proposal_temperature=cfg.proposal_temperature,
            aligner_temperature=cfg.aligner_temperature, proposal_top_p=cfg.proposal_top_p,
            aligner_top_p=cfg.aligner_top_p, top_k=cfg.top_k, repetition_penalty=cfg.repetition_penalty,
            kl_threshold=cfg.kl_threshold, kl_fallback=cfg.kl_fallback, stop=tuple(cfg.stop),
            template=cfg.template, **({"inra_lambda": cfg.inra_lambda, "lambda_field": cfg.lambda_field}
                                      if cfg.mode == "inra" else {}))
        if bar is not None:
            bar.close()
    except ValueError as e:  # every input error in ramjax is a named ValueError subclass
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if primary:
        print(f"wrote {summary.written} examples to {summary.output_file} ({summary.skipped} were already there, "
              f"{summary.total} in all)" + (f"; AlpacaEval file {summary.alpaca_output}" if summary.alpaca_output
                                            else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
