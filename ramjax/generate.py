"""Batch sampling over JSONL files: what ``sample.py`` runs, reusable from Python.

Two outputs, both resumable:

* ``samples`` (evaluation): one line per sample, ``{"index", "sample_index", "prompt", "text", "token_ids",
  "finish_reason", "length", "kl_fallback_rate", "ess_mean"}``, plus (optionally) an AlpacaEval JSON list
  ``[{"instruction", "output", "generator"}]`` with each prompt's first sample.
* ``training``: one line per input example, the example unchanged plus ``"proposal"`` (the sample's text; a list
  when ``num_samples > 1``), ``"proposal_token_ids"`` (the sampled ids, when the text was not cut at a stop string,
  so training sees exactly the sampled tokens) and ``"proposal_finish_reason"``. This is the file the ``ram``
  training stage reads (``ramjax.data`` format ``proposal_samples``).

Input lines carry the prompt as ``prompt`` (a string), ``messages`` (``{role, content}`` turns; a final assistant
turn is the reference response and is left out of the prompt) or ``instruction`` (+ ``input``, Alpaca).

Resuming. Results are appended and flushed once per batch. On start, the output's complete lines are counted (a
torn last line from a killed run is cut off, as is a partial group of a prompt's samples), and that many inputs
are skipped; the PRNG key of every example is tied to its line number (``example_offset``), so a resumed run
writes exactly the lines an uninterrupted one would: no duplicates, no lost rows.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Literal, Mapping, Sequence

import jax

from ramjax import distributed, files, report

log = logging.getLogger(__name__)

__all__ = ["GenerateError", "GenerateSummary", "read_prompt_records", "prompt_of", "generate_jsonl",
           "write_alpaca_eval"]


class GenerateError(ValueError):
    """A prompts file or output file cannot be used (missing, malformed line, no prompt field)."""


@dataclasses.dataclass
class GenerateSummary:
    """What one ``generate_jsonl`` call did."""

    total: int  # input examples
    skipped: int  # already in the output (resumed)
    written: int  # examples written by this call
    output_file: str
    alpaca_output: str | None = None


def read_prompt_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (blank lines skipped); errors name ``file:line``."""
    return _read_prompt_records(path)[0]


def _read_prompt_records(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[int]]:
    """``read_prompt_records`` and each record's line number in the file (from 1), for errors found later."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GenerateError(f"prompts file {path!r} does not exist")
    out, lines = [], []
    for i, obj in files.iter_jsonl(path, error=GenerateError, objects=True):
        prompt_of(obj, f"{path}:{i}")  # validate now, not after hours of sampling
        out.append(obj)
        lines.append(i)
    return out, lines


def _check_prompt_lengths(proposal, aligner, records: Sequence[Mapping[str, Any]], linenos: Sequence[int],
                          params: Any, prompts_file: str, draft: bool) -> None:
    """Raises ``sampler.ContextLengthError`` naming ``prompts_file:line`` when any prompt plus
    ``params.max_new_tokens`` does not fit in the sampled models' context: the rule ``sampler.sample`` applies to
    each batch, applied to every prompt before the first batch, so a too-long prompt in a later batch cannot fail
    the run after earlier batches were written. Prompts that cannot be encoded are ``GenerateError`` s, likewise
    naming the line."""
    from ramjax import sampler

    p, q, _ = sampler._resolve_models(proposal, aligner, params.mode, draft=draft)
    models = [m for m in (p, q) if m is not None]
    context = min(sampler._context_length(m.config) for m in models)
    smallest = min(models, key=lambda m: sampler._context_length(m.config))
    main = p if p is not None else q
    max_new = params.max_new_tokens
    too_long = []
    for rec, line in zip(records, linenos):
        try:
            (ids,) = sampler._encode_prompts([prompt_of(rec)], main.tokenizer, params.template, main.vocab_limit)
        except sampler.PromptError as e:
            what = str(e).replace("prompt 0", "the prompt", 1)
            raise GenerateError(f"{prompts_file}:{line}: {what}; fix or remove the line (nothing sampled)") from None
        if len(ids) + max_new > context:
            too_long.append((line, len(ids)))
    if too_long:
        line, n = too_long[0]
        more = ""
        if len(too_long) > 1:
            rest = [str(ln) for ln, _ in too_long[1:]]
            more = (f" ({len(rest)} more prompts are too long, at lines {', '.join(rest[:10])}"
                    + (", ..." if len(rest) > 10 else "") + ")")
        raise sampler.ContextLengthError(
            f"{prompts_file}:{line}: the prompt has {n} tokens; with max_new_tokens={max_new} it needs {n + max_new} "
            f"positions but the context is {context} (max_position_embeddings of {smallest.source or 'the model'})"
            f"{more}. Shorten or remove the prompt, or lower max_new_tokens; nothing was sampled or written")


def prompt_of(record: Mapping[str, Any], where: str = "record") -> str | list[dict[str, str]]:
    """The prompt of one record: ``prompt`` (str), ``messages`` (without a final assistant turn) or
    ``instruction`` (+ ``input``, joined by a blank line as in ``ramjax.data``). Preference pairs (TRL, HH-RLHF,
    UltraFeedback), TRL prompt/completion records and message-list prompts get the prompt training renders for
    them (``ramjax.data.record_prompt``), so one-time samples are drawn for exactly the prompt trained on."""
    if ("chosen" in record and "rejected" in record) or "completion" in record or isinstance(record.get("prompt"),
                                                                                               list):
        from ramjax import data as data_lib

        try:
            return data_lib.record_prompt(record, where)
        except data_lib.DataError as e:
            raise GenerateError(str(e)) from None
    if "prompt" in record:
        p = record["prompt"]
        if not isinstance(p, str):
            raise GenerateError(f"{where}: field 'prompt' must be a str, got {type(p).__name__}")
        return p
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise GenerateError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} strings")
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs:
            raise GenerateError(f"{where}: field 'messages' has no turn before the assistant's")
        return msgs
    if "instruction" in record:
        inst, extra = record["instruction"], record.get("input") or ""
        if not isinstance(inst, str) or not isinstance(extra, str):
            raise GenerateError(f"{where}: fields 'instruction' and 'input' must be strings")
        return inst + ("\n\n" + extra if extra else "")
    raise GenerateError(f"{where}: no prompt field; expected 'prompt', 'messages' or 'instruction' (found "
                        f"{sorted(record)})")


def _resume(path: str, per_record: int) -> int:
    """Number of input records already written to ``path``; cuts a torn last line and partial sample groups."""
    if not os.path.exists(path):
        return 0
    keep = 0  # byte offset after the last complete line
    lines = 0
    offsets = [0]
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                json.loads(raw)
            except ValueError:
                break
            keep += len(raw)
            lines += 1
            offsets.append(keep)
    done = lines // per_record
    cut = offsets[done * per_record]
    if cut != os.path.getsize(path):
        log.warning("%s: dropping %d bytes after the last complete example (an interrupted write)", path,
                    os.path.getsize(path) - cut)
        with open(path, "r+b") as f:
            f.truncate(cut)
    return done


def _check_creatable(path: str) -> None:
    """Raises ``GenerateError`` unless ``path`` can be written: an existing file, or a new one whose directory
    exists (or can be created under its nearest existing ancestor). Creates nothing."""
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise GenerateError(f"output_file {path!r} is not writable; fix its permissions or choose another path")
        return
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise GenerateError(f"output_file {path!r} cannot be created: {existing!r} is a file, not a directory; "
                            f"choose a path in a writable directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GenerateError(f"output_file {path!r} cannot be created: {existing!r} is not writable; choose a path "
                            f"in a writable directory")


def _open_output(path: str):
    """``path`` opened for appending (its directory created first)."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return open(path, "a", encoding="utf-8")
    except OSError as e:
        raise GenerateError(f"output_file {path!r} cannot be created ({e.strerror or e}); choose a path in a "
                            f"writable directory") from None


def _check_existing(path: str, records: Sequence[Mapping[str, Any]], per_record: int, output: str,
                    prompts_file: str) -> None:
    """Raises ``GenerateError`` (touching nothing) when the complete lines already in ``path`` are not this prompt
    set's first examples in order: resuming would keep another run's rows and never sample some prompts."""
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                return  # a torn last line: _resume cuts it
            try:
                line = json.loads(raw)
            except ValueError:
                return
            i = (lineno - 1) // per_record
            if i >= len(records):
                return  # more examples than prompts: _resume's check names that
            want = prompt_of(records[i])
            got = line.get("prompt") if isinstance(line, Mapping) else None
            if output == "training" and isinstance(line, Mapping):
                got = prompt_of(line) if _has_prompt(line) else None  # the input record plus the sample's fields
            if got != want or (output == "samples" and line.get("index", i) != i):
                raise GenerateError(
                    f"{path}:{lineno} holds a sample of another prompt than example {i} of {prompts_file} "
                    f"({_short(got)} vs {_short(want)}): the file belongs to another prompt set or order. Choose a "
                    f"new output_file (or move this one away); it was left untouched")


def _has_prompt(rec: Mapping[str, Any]) -> bool:
    try:
        prompt_of(rec)
    except Exception:  # noqa: BLE001 -- any record prompt_of cannot read is a mismatch
        return False
    return True


def _short(x: Any, n: int = 60) -> str:
    t = json.dumps(x, ensure_ascii=False) if not isinstance(x, str) else repr(x)
    return t if len(t) <= n else t[:n] + "..."


def generate_jsonl(proposal, aligner, prompts_file: str | os.PathLike, output_file: str | os.PathLike,
                   params: Any = None, *, output: Literal["samples", "training"] = "samples", batch_size: int = 8,
                   num_samples: int = 1, seed: int = 0, alpaca_output: str | os.PathLike | None = None,
                   generator: str = "ramjax", progress: Callable[[int, int], None] | None = None,
                   lambda_field: str | None = "lambda", rules: Any = None, **overrides: Any) -> GenerateSummary:
    """Samples every prompt of ``prompts_file`` and appends the results to ``output_file`` (see the module doc).

    proposal, aligner: ``ramjax.api.Model`` s (``aligner`` may be None in mode ``proposal``).
    batch_size: prompts per jitted call (each with ``num_samples`` rows).
    progress: called as ``progress(done, total)`` (examples in the output, examples in all) once after resuming and
        after every batch.
    params, overrides: the ``SamplingParams`` (or a preset name, or None = the defaults) and field overrides, as
        for ``ramjax.sampler.sample``; seed, rules: passed to it.
    lambda_field: mode ``inra``: a record with this field is sampled with its own λ (else ``inra_lambda``); the
        samples output then records each line's ``lambda``.
    Several processes (``jax.distributed``; models loaded on each process's local devices): each samples its
    share of every round of batches; the output is the one a single process writes (process 0 writes it).
    """
    from ramjax import sampler
    from ramjax import sharding as shd
    from ramjax.sampling_params import resolve

    # Everything that can be checked is checked before the output (or its directory) is created or touched: the
    # sampling parameters, the models (mode, vocabularies, tokenizer files), the paths and the prompts file.
    params = resolve(params, overrides)
    from ramjax import speculative

    k = speculative.check_request(params.mode, params.num_speculative_tokens, proposal, aligner)
    sampler._resolve_models(proposal, aligner, params.mode, draft=bool(k))  # what sample() checks, up front
    rules = shd.DEFAULT_RULES if rules is None else rules
    if output not in ("samples", "training"):
        raise GenerateError(f"output={output!r}; expected 'samples' or 'training'")
    prompts_file, output_file = os.fspath(prompts_file), os.fspath(output_file)
    if os.path.abspath(prompts_file) == os.path.abspath(output_file):
        raise GenerateError(f"output_file {output_file!r} is the prompts file; choose another path")
    for key, path in (("output_file", output_file), ("alpaca_output", alpaca_output)):
        if path is not None and os.path.isdir(path):
            raise GenerateError(f"{key} {os.fspath(path)!r} is a directory; give a file path, e.g. "
                                f"{os.path.join(path, 'samples.jsonl' if key == 'output_file' else 'alpaca.json')!r}")
    records, linenos = _read_prompt_records(prompts_file)
    # every prompt against the context now: a too-long prompt in a later batch must not stop the run after earlier
    # batches were written
    _check_prompt_lengths(proposal, aligner, records, linenos, params, prompts_file, draft=bool(k))
    per_record = num_samples if output == "samples" else 1
    primary = jax.process_index() == 0
    # Several processes: each samples its batch of every round of process_count batches on its own devices
    # (``distributed.local_share``); process 0 alone reads, resumes and appends to the output, in example order.
    refused: GenerateError | None = None
    done = 0
    if primary:
        try:
            _check_creatable(output_file)
            _check_existing(output_file, records, per_record, output, prompts_file)
            done = _resume(output_file, per_record)
        except GenerateError as e:
            refused, done = e, -1
    done = distributed.broadcast_int(done if primary else 0)
    if done < 0:  # every process stops, not only the one that read the file
        raise refused or GenerateError(f"process 0 refused output_file {output_file!r} (see its error)")
    if done > len(records):
        raise GenerateError(f"{output_file} already holds {done} examples but {prompts_file} has only "
                            f"{len(records)}; it belongs to another prompts file: choose a new output_file")
    if done:
        log.info("resuming %s: %d of %d examples already written", output_file, done, len(records))
    written = 0
    if progress is not None:
        progress(done, len(records))
    # opened when the first batch is sampled: an error in it (a prompt too long, non-finite logits) leaves no file
    out = None
    try:
        for round_start in range(done, len(records), batch_size * jax.process_count()):
            start, chunk = distributed.local_share(records, round_start, batch_size)
            lines = _sample_lines(proposal, aligner, chunk, start, output, batch_size, num_samples, lambda_field,
                                  params, seed, rules) if chunk else []
            parts = distributed.allgather_objects((len(chunk), lines))
            n_round = sum(n for n, _ in parts)
            if primary:
                if out is None:
                    out = _open_output(output_file)
                out.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for _, ls in parts for line in ls))
                out.flush()
                os.fsync(out.fileno())
            written += n_round
            if progress is not None:
                progress(done + written, len(records))
    finally:
        if out is not None:
            out.close()
    if primary and out is None and not os.path.exists(output_file):  # no prompts: the (empty) output still exists
        files.atomic_write(output_file, "")
    summary = GenerateSummary(total=len(records), skipped=done, written=written, output_file=output_file)
    if alpaca_output is not None and output == "samples" and primary:
        summary.alpaca_output = write_alpaca_eval(output_file, alpaca_output, generator)
    return summary


def training_record(record: Mapping[str, Any], samples: Sequence[Any]) -> dict[str, Any]:
    """One input record with its proposal sample(s) for RAM training: ``proposal`` (the text, or the list of texts
    for several samples), ``proposal_token_ids`` of the first sample (unless a stop string cut its text inside
    the tokens) and ``proposal_finish_reason``."""
    texts = [s.text for s in samples]
    line = dict(record)
    line["proposal"] = texts[0] if len(texts) == 1 else texts
    first = samples[0]
    if first.finish_reason != "stop":  # a stop string cuts the text inside the tokens
        line["proposal_token_ids"] = list(first.token_ids)
    line["proposal_finish_reason"] = first.finish_reason
    return line


def _sample_lines(proposal, aligner, chunk: Sequence[Mapping[str, Any]], start: int, output: str, batch_size: int,
                  num_samples: int, lambda_field: str | None, params: Any, seed: int, rules: Any) -> list[dict]:
    """The output lines of one batch of records (``chunk``, the first being example ``start``), sampled with
    ``params`` (a ``SamplingParams``)."""
    from ramjax import sampler

    prompts = [prompt_of(r) for r in chunk]
    lams = None
    if params.mode == "inra":
        lams = _chunk_lambdas(chunk, lambda_field, params.inra_lambda, start)
        params = params.replace(inra_lambda=tuple(lams))
    results = sampler.sample(proposal, aligner, prompts, params, num_samples=num_samples, seed=seed,
                             batch_size=batch_size * num_samples, example_offset=start, rules=rules)
    lines = []
    for k, (rec, prompt, samples) in enumerate(zip(chunk, prompts, results)):
        if output == "training":
            lines.append(training_record(rec, samples))
        else:
            for s in samples:
                d = {"index": start + k, "sample_index": s.sample_index, "prompt": prompt}
                if lams is not None:
                    d["lambda"] = lams[k]
                d.update(report.jsonable(s.to_dict()))  # NaN/inf are not JSON: None
                lines.append(d)
    return lines


def _chunk_lambdas(chunk: Sequence[Mapping[str, Any]], field: str | None, default: Any, start: int) -> list[float]:
    """InRa's λ per record: the record's ``field`` when present (a number), else ``default`` (a number)."""
    out = []
    for k, rec in enumerate(chunk):
        v = rec.get(field, default) if field else default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise GenerateError(f"prompt record {start + k}: {field}={v!r} is not a number (InRa's λ)")
        out.append(float(v))
    return out


def write_alpaca_eval(samples_file: str | os.PathLike, path: str | os.PathLike, generator: str) -> str:
    """AlpacaEval's model-output JSON (``instruction``, ``output``, ``generator``; each prompt's first sample) from
    a ``samples`` JSONL. Message prompts become their last user turn."""
    records, outputs = [], []
    for d in files.read_jsonl(samples_file, error=GenerateError, objects=True):
        if d.get("sample_index", 0) != 0:
            continue
        prompt = d["prompt"]
        if isinstance(prompt, list):
            prompt = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), prompt[-1]["content"])
        records.append({"instruction": prompt})
        outputs.append(d["text"] or "")
    return report.write_alpacaeval(path, records, outputs, generator)
