"""Dataset formats: each example read from JSONL (or TFDS, grain ArrayRecord, Hugging Face ``datasets``) into a
checked ``Record`` of one of five formats; ``ramjax.data`` tokenizes records into batches.

Formats (one JSON object per line, or rows read through Hugging Face ``datasets`` with ``source: hf``;
``format: auto`` detects per file from the first record's fields, and fields that fit two readings are an error):

    proposal_samples  {"prompt", "response", "proposal", ...}   written by sample.py: ``proposal`` is P_M's one-time
                      sample for the prompt (optionally ``proposal_token_ids``, the sampled ids, used as-is); the
                      rest of the line is any sft/chat/preference record, whose response (``chosen`` for pairs)
                      is y_data
    preference        {"prompt", "chosen", "rejected"}, in any of these shapes:
                      - strings (TRL standard);
                      - message lists ``[{"role", "content"}]`` (TRL conversational): the prompt is the
                        ``prompt`` messages, or when ``chosen``/``rejected`` repeat it (UltraFeedback-binarized,
                        whose ``prompt`` is a string and extra fields such as ``score_chosen`` are ignored) or
                        there is no ``prompt`` (implicit prompt), the messages the two lists share; what follows
                        must be one assistant message in each;
                      - HH-RLHF: no ``prompt``, ``chosen``/``rejected`` whole dialogues of ``"\\n\\nHuman: …"`` /
                        ``"\\n\\nAssistant: …"`` turns: the prompt is their longest shared prefix ending with
                        ``"\\n\\nAssistant:"``, parsed into user/assistant messages, and the responses are the rest
    chat              {"messages": [{"role", "content"}, ...]}  loss on assistant turns only
    sft               {"prompt", "response"} or TRL's {"prompt", "completion"}; each a string or a message list
                      (a completion list is one assistant message); Alpaca's {"instruction", "input", "output"}
    text              {"text"}                 pretraining: loss on every token; long documents are split into
                                               chunks of ``max_len`` that overlap by one token, so no target is lost

A prompt given as messages is rendered turn by turn: with the plain template each user turn as
``"\\n\\nHuman: {content}\\n\\nAssistant: "`` and each earlier assistant turn as its text; with the chat template by
the tokenizer's template. Only the response tokens (and EOS) are trained on.

A malformed line (bad JSON, missing field, wrong type) is a ``DataError`` naming ``file:line`` and the field.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ramjax import files

log = logging.getLogger(__name__)

FORMATS = ("sft", "chat", "preference", "text", "proposal_samples")


class DataError(ValueError):
    """Training data cannot be read or used as configured (names the file:line and field where it can)."""




@dataclasses.dataclass
class Record:
    """One parsed example. ``where`` is ``file:line`` (or ``tfds:name/split:i``); ``data`` keeps every original
    field (renamed by ``field_map``), with the format's fields checked."""

    where: str
    format: str
    data: dict[str, Any]


def detect_format(obj: Mapping[str, Any]) -> str | None:
    """The format a record's fields indicate (see the module docstring), or None.

    Raises ``DataError`` when the fields fit two readings (e.g. both ``response`` and ``completion``, or
    ``messages`` next to a prompt/response pair), since guessing would train on the wrong text.
    """
    if "proposal" in obj:
        return "proposal_samples"
    if "chosen" in obj and "rejected" in obj:
        return "preference"  # UltraFeedback-binarized also carries ``messages`` (= chosen): the pair wins
    if ("chosen" in obj) != ("rejected" in obj) and not any(k in obj for k in ("response", "completion",
                                                                                "messages", "output")):
        have, miss = ("chosen", "rejected") if "chosen" in obj else ("rejected", "chosen")
        raise DataError(f"field {have!r} is present but {miss!r} is missing: preference pairs need both")
    if "response" in obj and "completion" in obj:
        raise DataError("the record has both 'response' and 'completion', so the response is ambiguous; drop one "
                        "or rename it with data.field_map")
    single = "prompt" in obj and ("response" in obj or "completion" in obj)
    if "messages" in obj:
        if single:
            raise DataError("the record has both 'messages' and a prompt/response pair, so the training text is "
                            "ambiguous; set data.format=chat or data.format=sft (or rename with data.field_map)")
        return "chat"
    if single or ("instruction" in obj and "output" in obj):
        return "sft"
    if "text" in obj:
        return "text"
    return None


def _field(obj: Mapping[str, Any], name: str, where: str, fmt: str, kind: type = str) -> Any:
    if name not in obj:
        raise DataError(f"{where}: field {name!r} is missing (format {fmt}; the line has fields "
                        f"{', '.join(map(repr, obj)) or 'none'})")
    value = obj[name]
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {name!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _check_messages(msgs: Any, where: str, fmt: str, name: str = "messages") -> list[dict[str, str]]:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field {name!r} must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(msgs):
        f = f"{name}[{i}]"
        if not isinstance(m, Mapping):
            raise DataError(f"{where}: field {f!r} must be an object with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"{where}: field {f + '.' + key!r} is missing (format {fmt})")
            if not isinstance(m[key], str):
                raise DataError(f"{where}: field {f + '.' + key!r} must be a str, got {type(m[key]).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _str_or_messages(obj: Mapping[str, Any], name: str, where: str, fmt: str) -> str | list[dict[str, str]]:
    """Field ``name`` as a string or a checked conversational message list (TRL's two shapes)."""
    if name not in obj:
        raise DataError(f"{where}: field {name!r} is missing (format {fmt}; the line has fields "
                        f"{', '.join(map(repr, obj)) or 'none'})")
    value = obj[name]
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _check_messages(value, where, fmt, name)
    raise DataError(f"{where}: field {name!r} must be a str, got {type(value).__name__} (or a list of "
                    f"{{role, content}} messages)")


def prompt_messages(prompt: str | Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """A prompt as the conversation before the response: a string is one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def _one_assistant_message(msgs: list[dict[str, str]], where: str, name: str) -> str:
    """The content of the single assistant message that a response given as a message list must be."""
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        roles = [m["role"] for m in msgs]
        raise DataError(f"{where}: after the prompt, field {name!r} must be one assistant message, got the roles "
                        f"{roles}; keep multi-turn conversations in a 'messages' (chat) file instead")
    return msgs[0]["content"]


def _check_context(context: list[dict[str, str]], where: str) -> list[dict[str, str]]:
    if not context or context[-1]["role"] == "assistant":
        raise DataError(f"{where}: the prompt must end with a user (or system) turn before the response, got the "
                        f"roles {[m['role'] for m in context]}")
    return context


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ASSISTANT = "\n\nAssistant:"


def split_hh_dialogue(chosen: str, rejected: str, where: str = "record") -> tuple[list[dict[str, str]], str, str]:
    """Splits an HH-RLHF pair (two whole dialogues in ``"\\n\\nHuman: …\\n\\nAssistant: …"`` turns, no prompt field)
    into (prompt messages, chosen response, rejected response).

    The prompt is the longest shared prefix of the two dialogues that ends with ``"\\n\\nAssistant:"``, parsed into
    user/assistant turns (contents stripped); the responses are what follows it, without the leading space. When
    the dialogues part before their last assistant turn, the responses keep the remaining turns as text.
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(_HH_ASSISTANT)
    if cut < 0:
        raise DataError(f"{where}: field 'prompt' is missing, and 'chosen' and 'rejected' do not share a dialogue "
                        f"ending with '\\n\\nAssistant:' (the HH-RLHF layout), so the prompt cannot be split off; "
                        f"add a 'prompt' field or rename fields with data.field_map")
    cut += len(_HH_ASSISTANT)
    parts = _HH_TURN.split(chosen[:cut])
    messages = [{"role": "system", "content": parts[0].strip()}] if parts[0].strip() else []
    for role, text in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": text.strip()})
    messages = messages[:-1]  # the final, empty "Assistant:" is where the responses start
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{where}: the dialogue shared by 'chosen' and 'rejected' has no '\\n\\nHuman:' turn before "
                        f"the responses (HH-RLHF layout expected)")
    return _check_context(messages, where), chosen[cut:].lstrip(), rejected[cut:].lstrip()


def _canonical_pair(obj: dict[str, Any], where: str, fmt: str) -> None:
    """Rewrites ``prompt``/``chosen``/``rejected`` in place to (str or message-list prompt, str, str).

    Accepted: strings with a prompt (TRL standard); strings without one (HH-RLHF, ``split_hh_dialogue``); message
    lists (TRL conversational, with an explicit ``prompt`` or an implicit one; UltraFeedback-binarized, whose
    ``chosen``/``rejected`` repeat the prompt): the prompt is the ``prompt`` messages or else the messages the two
    lists share, and what follows must be one assistant message in each.
    """
    chosen = _str_or_messages(obj, "chosen", where, fmt)
    rejected = _str_or_messages(obj, "rejected", where, fmt)
    prompt = _str_or_messages(obj, "prompt", where, fmt) if "prompt" in obj else None
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(f"{where}: fields 'chosen' and 'rejected' must both be strings or both message lists")
    if isinstance(chosen, str):
        if prompt is None:
            obj["prompt"], obj["chosen"], obj["rejected"] = split_hh_dialogue(chosen, rejected, where)
        return
    if isinstance(prompt, list) and chosen[:len(prompt)] == prompt and rejected[:len(prompt)] == prompt:
        prompt = None  # the lists repeat the prompt: it is their shared prefix, found below
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n > 0 and not isinstance(prompt, list):
        context = chosen[:n]  # the lists hold the whole conversation (UltraFeedback: a string prompt repeated)
    elif prompt is None:
        raise DataError(f"{where}: field 'prompt' is missing and 'chosen'/'rejected' share no messages, so there "
                        f"is no prompt; add a 'prompt' field")
    else:
        context = prompt_messages(prompt) + chosen[:n]
    obj["prompt"] = _check_context(context, where)
    obj["chosen"] = _one_assistant_message(chosen[n:], where, "chosen")
    obj["rejected"] = _one_assistant_message(rejected[n:], where, "rejected")


def _canonical_single(obj: dict[str, Any], where: str, fmt: str) -> None:
    """Rewrites ``prompt``/``response`` in place to (str or message-list prompt, str). The response may be given
    as ``response`` or TRL's ``completion``, each a string or (completion) one assistant message, optionally
    after a copy of the prompt messages."""
    prompt = _str_or_messages(obj, "prompt", where, fmt)
    name = "completion" if "response" not in obj and "completion" in obj else "response"
    response = _str_or_messages(obj, name, where, fmt)
    if isinstance(response, list):
        if isinstance(prompt, list) and response[:len(prompt)] == prompt:
            response = response[len(prompt):]
        response = _one_assistant_message(response, where, name)
    obj["prompt"] = prompt if isinstance(prompt, str) else _check_context(prompt, where)
    obj["response"] = response


def parse_record(obj: Any, where: str, fmt: str, field_map: Mapping[str, str] | None) -> Record:
    """Checks one decoded record against ``fmt`` (or detects it) and returns it as a ``Record`` whose fields are
    canonical: ``prompt`` a string or a message list ending with a user/system turn; ``response``, ``chosen``,
    ``rejected`` strings (see ``_canonical_pair`` / ``_canonical_single`` for the accepted shapes)."""
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
    obj = dict(obj)
    for src, dst in (field_map or {}).items():
        if src in obj:
            obj[dst] = obj.pop(src)
    if fmt == "auto":
        try:
            fmt = detect_format(obj)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        if fmt is None:
            raise DataError(f"{where}: cannot tell the format from the fields {sorted(obj)}; expected one of: "
                            f"prompt+response or prompt+completion (sft), messages (chat), prompt+chosen+rejected "
                            f"or HH-RLHF chosen+rejected dialogues (preference), text, or a sample.py file with "
                            f"proposal; or set data.field_map to rename fields")
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; expected one of {FORMATS} or auto")
    if fmt in ("sft", "proposal_samples") and "prompt" not in obj and "messages" not in obj and "instruction" in obj:
        # Alpaca: instruction (+ input) -> prompt, output -> response
        inst = _field(obj, "instruction", where, fmt)
        extra = obj.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: field 'input' must be a str, got {type(extra).__name__}")
        obj["prompt"] = inst + ("\n\n" + extra if extra else "")
        if "response" not in obj and "output" in obj:
            obj["response"] = obj["output"]
    if fmt == "text":
        _field(obj, "text", where, fmt)
    elif fmt == "sft":
        _canonical_single(obj, where, fmt)
    elif fmt == "chat":
        _field(obj, "messages", where, fmt, list)
        msgs = _check_messages(obj["messages"], where, fmt)
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: field 'messages' has no assistant turn, so there is nothing to train on")
        obj["messages"] = msgs
    elif fmt == "preference":
        _canonical_pair(obj, where, fmt)
    elif fmt == "proposal_samples":
        prop = obj.get("proposal")
        if isinstance(prop, list) and prop and all(isinstance(p, str) for p in prop):
            obj["proposal"] = prop[0]  # several samples per prompt: RAM uses one y_PM per prompt
        _field(obj, "proposal", where, fmt)
        if "proposal_token_ids" in obj:
            ids = obj["proposal_token_ids"]
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise DataError(f"{where}: field 'proposal_token_ids' must be a list of ints")
        if "chosen" in obj and "rejected" in obj:  # sampled from preference data: y_data is the chosen response
            _canonical_pair(obj, where, fmt)
            obj.setdefault("response", obj["chosen"])
        elif "messages" in obj and "prompt" not in obj:
            msgs = _check_messages(obj["messages"], where, fmt)
            if msgs[-1]["role"] != "assistant":
                raise DataError(f"{where}: field 'messages' must end with the assistant turn (y_data) in a proposal "
                                f"samples file")
            obj["messages"] = msgs
        else:
            if "response" not in obj and "completion" not in obj and "chosen" in obj:
                obj["response"] = obj["chosen"]
            _canonical_single(obj, where, fmt)
    return Record(where, fmt, obj)


def record_prompt(obj: Mapping[str, Any], where: str = "record", field_map: Mapping[str, str] | None = None
                  ) -> str | list[dict[str, str]]:
    """The prompt that training renders for one raw record of any supported format (a string, or messages ending
    with a user/system turn): sample.py draws the one-time proposal samples for exactly this prompt."""
    rec = parse_record(obj, where, "auto", field_map)
    if rec.format == "text":
        raise DataError(f"{where}: a text record has no prompt")
    d = rec.data
    if "prompt" in d:
        return d["prompt"]
    msgs = d["messages"]
    return msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs


def read_jsonl(path: str, format: str = "auto", field_map: Mapping[str, str] | None = None) -> list[Record]:
    """Parses a JSONL file; the format is detected from its first record when ``format="auto"`` and every other
    line must then fit it. Blank lines are skipped. Raises ``DataError`` naming ``path:line`` and the field."""
    if not os.path.exists(path):
        raise DataError(f"data file {path!r} not found")
    rows = ((f"{path}:{lineno}", obj) for lineno, obj in files.iter_jsonl(path, error=DataError))
    return _parse_all(rows, format, field_map, f"data file {path!r} has no records")


def _parse_all(rows: Iterable[tuple[str, Any]], format: str, field_map: Mapping[str, str] | None,
               empty: str) -> list[Record]:
    """``parse_record`` over ``(where, object)`` rows in order: with ``format="auto"`` the first record's detected
    format is the one every other must fit. ``DataError(empty)`` when there are none."""
    records: list[Record] = []
    fmt = format
    for where, obj in rows:
        rec = parse_record(obj, where, fmt, field_map)
        fmt = rec.format
        records.append(rec)
    if not records:
        raise DataError(empty)
    return records


def _decode_bytes(x: Any) -> Any:
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray):
        return _decode_bytes(x.tolist())
    if isinstance(x, np.generic):
        return _decode_bytes(x.item())
    if isinstance(x, Mapping):
        return {k: _decode_bytes(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_decode_bytes(v) for v in x]
    return x


def read_tfds(name: str, split: str = "train", data_dir: str | None = None, format: str = "auto",
              field_map: Mapping[str, str] | None = None) -> list[Record]:
    """Reads a prepared TensorFlow Datasets dataset (no download); byte strings are decoded as UTF-8 and the
    records parsed like JSONL lines. Needs the optional ``tensorflow-datasets`` package."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("data.source=tfds needs the optional packages tensorflow and tensorflow-datasets "
                          "(pip install tensorflow-datasets tensorflow); or convert the data to JSONL and use "
                          "data.source=jsonl") from e
    ds = tfds.load(name, split=split, data_dir=data_dir, download=False)
    rows = ((f"tfds:{name}/{split}:{i}", _decode_bytes(ex)) for i, ex in enumerate(tfds.as_numpy(ds)))
    return _parse_all(rows, format, field_map, f"tfds dataset {name}/{split} is empty")


def read_grain(paths: Sequence[str], format: str = "auto", field_map: Mapping[str, str] | None = None) -> list[Record]:
    """Reads ArrayRecord files whose records are UTF-8 JSON objects (the JSONL formats) through grain's
    ``ArrayRecordDataSource``. Needs the optional ``grain`` package (and ``array_record``)."""
    try:
        import grain.python as pygrain
        source_cls = pygrain.ArrayRecordDataSource
    except (ImportError, AttributeError):
        try:
            import grain
            source_cls = grain.sources.ArrayRecordDataSource
        except (ImportError, AttributeError) as e:
            raise ImportError("data.source=grain needs the optional package grain with array_record "
                              "(pip install grain array_record); or use data.source=jsonl") from e
    source = source_cls(list(paths))

    def rows():
        for i in range(len(source)):
            where = f"grain:{','.join(paths)}[{i}]"
            raw = source[i]
            try:
                yield where, json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{where}: record is not UTF-8 JSON ({e})") from None

    return _parse_all(rows(), format, field_map, f"grain source {list(paths)} is empty")


_HF_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


def read_hf(files: Sequence[str] = (), *, path: str | None = None, name: str | None = None, split: str = "train",
            format: str = "auto", field_map: Mapping[str, str] | None = None,
            cache_dir: str | None = None) -> list[Record]:
    """Reads records through Hugging Face ``datasets`` (an optional dependency), parsed like JSONL lines.

    Either local ``files`` (parquet, JSON/JSONL, CSV or Arrow; the builder follows the extension, all files one
    kind) or ``path``: a dataset directory or a Hub dataset id already in the local cache (``name`` is its
    configuration, ``split`` the split; ``files`` then narrows it as ``data_files``). Fields that are None (a JSON
    row without a field other rows have) are dropped before parsing.
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError("data.source=hf needs the optional package datasets (pip install datasets, or "
                          "pip install 'ramjax[data]'); or convert the data to JSONL and use data.source=jsonl") from e
    files = list(files)
    for f in files:
        if not os.path.exists(f):
            raise DataError(f"data file {f!r} not found")
    if path is None:
        if not files:
            raise DataError("data.source=hf needs data.train_files (parquet/JSON/JSONL/CSV files) or data.hf_path")
        kinds = {_HF_BUILDERS.get(os.path.splitext(f)[1].lower()) for f in files}
        if None in kinds or len(kinds) > 1:
            raise DataError(f"data.source=hf reads files ending in {sorted(_HF_BUILDERS)}, all of one kind; got "
                            f"{files}; or set data.hf_path to a dataset directory")
        builder, label, split = kinds.pop(), ",".join(files), "train"  # data_files land in the "train" split
        ds = datasets.load_dataset(builder, data_files=files, split=split, cache_dir=cache_dir)
    else:
        label = path
        try:
            ds = datasets.load_dataset(path, name, data_files=files or None, split=split, cache_dir=cache_dir)
        except (FileNotFoundError, ValueError, ConnectionError) as e:
            raise DataError(f"data.hf_path={path!r} (split {split!r}) cannot be loaded: {e}. It must be a local "
                            f"dataset directory or a Hub dataset already in the cache (nothing is downloaded "
                            f"offline)") from e
    rows = ((f"hf:{label}/{split}:{i}", {k: v for k, v in row.items() if v is not None}) for i, row in enumerate(ds))
    return _parse_all(rows, format, field_map, f"dataset {label} ({split}) has no records")


def read_records(files: Sequence[str], format: str = "auto", field_map: Mapping[str, str] | None = None,
                 source: str = "jsonl", tfds_name: str | None = None, split: str = "train",
                 tfds_data_dir: str | None = None, hf_path: str | None = None,
                 hf_name: str | None = None) -> list[Record]:
    """All records of a data source, in file order (each JSONL file detects its own format)."""
    if source == "jsonl":
        if not files:
            raise DataError("no data files given; set data.train_files=[a.jsonl,...]")
        return [r for path in files for r in read_jsonl(path, format, field_map)]
    if source == "hf":
        return read_hf(files, path=hf_path, name=hf_name, split=split, format=format, field_map=field_map)
    if source == "tfds":
        if not tfds_name:
            raise DataError("data.source=tfds needs data.tfds_name")
        return read_tfds(tfds_name, split, tfds_data_dir, format, field_map)
    if source == "grain":
        if not files:
            raise DataError("data.source=grain needs data.train_files (ArrayRecord paths)")
        return read_grain(files, format, field_map)
    raise DataError(f"unknown data source {source!r}; expected jsonl, hf, tfds or grain")


def prompt_response(rec: Record) -> tuple[str | list[dict[str, str]], str]:
    """A single-response record's prompt (a string when it is one user turn, else the message list before the
    response) and its data response (preference records: the chosen one)."""
    if rec.format == "text":
        raise DataError(f"{rec.where}: a text record has no prompt and response")
    if rec.format == "preference":
        context, resp = prompt_messages(rec.data["prompt"]), rec.data["chosen"]
    else:
        context, resp = context_and_response(rec)
        if resp is None:
            resp = rec.data["response"]
    if not isinstance(resp, str):  # TRL conversational shapes: the response as one assistant message
        resp = _one_assistant_message(list(resp), rec.where, "response")
    if len(context) == 1 and context[0]["role"] in ("user", "human"):
        return context[0]["content"], resp
    return context, resp


def record_text(rec: Record) -> str:
    """A record as one plain text, what a tokenizer trains on: a text record as is; otherwise every user turn in
    the plain dialogue template (``"\n\nHuman: {prompt}\n\nAssistant: "``) followed by the response."""
    if rec.format == "text":
        return rec.data["text"]
    prompt, resp = prompt_response(rec)
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = "".join(PLAIN_PROMPT.replace("{prompt}", m["content"]) if m["role"] in ("user", "human") else m["content"]
                   for m in turns)
    return text + resp


# The plain dialogue template (as ``ramjax.tokenizer.PLAIN_TEMPLATE``; repeated here so that data needs no tokenizer).
PLAIN_PROMPT = "\n\nHuman: {prompt}\n\nAssistant: "


def context_and_response(rec: Record) -> tuple[list[dict[str, str]], str | None]:
    """Context messages (ending with a user turn) and the data response of a single-response record."""
    d = rec.data
    if "messages" in d and "prompt" not in d:
        msgs = d["messages"]
        return list(msgs[:-1]), msgs[-1]["content"]
    return prompt_messages(d["prompt"]), None
