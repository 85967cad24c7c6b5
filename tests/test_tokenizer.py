"""ramjax.tokenizer against transformers.AutoTokenizer on the same (tiny, locally trained) files."""
from __future__ import annotations

import json
import os
import random
import shutil
import unicodedata

import jinja2
import pytest
import tokenizer_fixtures as fx  # tests/ is on sys.path (pytest rootdir-relative import)
from transformers import AutoTokenizer

from ramjax.tokenizer import (
    PLAIN_TEMPLATE,
    ChatTemplateError,
    Tokenizer,
    TokenizerError,
    VocabMismatchError,
    check_vocab_compatible,
    has_tokenizer,
    load_tokenizer,
    train_sentencepiece,
)

STRINGS = [
    "", " ", "  ", "hello", " hello", "hello ", "  hello  world  ", "   leading", "trailing   ", "a  b   c",
    "a\tb", "\t\tx", "\n", "\n\n", "line1\nline2\n\n", "x\r\ny", " \n \n", "The quick brown fox.",
    "12345 + 678 = 13023", "What is 2+2?", "Don't you think it's fine? I'm sure.",
    "Café naïve résumé", "ÅÉÎÕÜ ñ ç", "e\u0301 combining accent", "\u00a0nbsp\u2009thin",
    "日本語のテキストです。", "中文 and English mixed", "한국어", "😀🎉 emoji 👍🏽", "👨‍👩‍👧 family", "\U0010ffff",
    "def f(x):\n    return x * 2\n", "<html>&amp;</html>", "▁already▁metaspace",
    "\n\nHuman: what is 3+4?\n\nAssistant: 7",
]
# Special tokens of every fixture written inside text: they must map to their ids exactly as in transformers.
SPECIAL_STRINGS = [
    "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>", "x<|im_end|>y", "<|begin_of_text|>hey",
    "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>", "<s>hello</s>", "hello<s>world", "<s> hello",
    " <s> x", "x </s>", "<unk>", "a<|sep|>b", "<|sep|> x", "[INST] hi [/INST]",
]
MESSAGES = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2? 😀"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "  and 3+3?\n"}],
    [{"role": "user", "content": "日本語"}, {"role": "assistant", "content": " Café "},
     {"role": "user", "content": "again", "name": None}],
]
KINDS = ["qwen", "llama", "sentencepiece"]


def _build(kind: str, directory) -> None:
    if kind == "sentencepiece":
        fx.make_sentencepiece(directory)
    else:
        fx.make_hf_tokenizer(directory, kind)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    out = {}
    for kind in KINDS:
        out[kind] = str(tmp_path_factory.mktemp(kind))
        _build(kind, out[kind])
    return out


@pytest.fixture(scope="module")
def refs(dirs):
    return {kind: AutoTokenizer.from_pretrained(d) for kind, d in dirs.items()}


@pytest.fixture(scope="module")
def toks(dirs):
    return {kind: load_tokenizer(d) for kind, d in dirs.items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tokenizer from train_sentencepiece on task-like text (the embedded pipeline's recipe)."""
    rng = random.Random(0)
    texts = []
    for _ in range(600):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        texts.append(f"\n\nHuman: What is {a} + {b}?\n\nAssistant: {a + b}")
        w = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8)))
        texts.append(f"\n\nHuman: Reverse the string {w}.\n\nAssistant: {w[::-1]}")
    d = str(tmp_path_factory.mktemp("trained"))
    tok = train_sentencepiece(texts, 400, d, user_defined_symbols=["<|sep|>"])
    return texts, d, tok


# ------------------------------------------------------------------------------------------------- ids vs transformers


@pytest.mark.parametrize("kind", KINDS)
def test_encode_matches_transformers(kind, refs, toks):
    ref, tok = refs[kind], toks[kind]
    for s in STRINGS + SPECIAL_STRINGS:
        assert tok.encode(s) == ref(s, add_special_tokens=False)["input_ids"], s
        assert tok.encode(s, add_bos=True) == ref(s)["input_ids"], s


@pytest.mark.parametrize("kind", KINDS)
def test_vocab_and_special_ids_match_transformers(kind, refs, toks):
    ref, tok = refs[kind], toks[kind]
    assert tok.vocab_size == len(ref)
    assert tok.get_vocab() == ref.convert_ids_to_tokens(list(range(len(ref))))
    assert tok.bos_id == ref.bos_token_id
    assert tok.eos_id == ref.eos_token_id
    assert tok.pad_id == (ref.pad_token_id if ref.pad_token_id is not None else ref.eos_token_id)
    # The ids decode(skip_special_tokens=True) drops: added tokens flagged special (what the backend skips).
    assert tok.special_ids == {i for i, t in ref.added_tokens_decoder.items() if t.special}
    for i in (0, 5, tok.vocab_size - 1):
        assert tok.token_to_id(tok.id_to_token(i)) == i
    assert tok.token_to_id("definitely-not-a-token-\u2603\u2603") is None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(kind, skip, refs, toks):
    ref, tok = refs[kind], toks[kind]
    for s in STRINGS + SPECIAL_STRINGS:
        ids = ref(s)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), s
    # Invalid UTF-8 from a lone byte token decodes the same way (replacement characters).
    lone = [i for i in range(tok.vocab_size) if tok.id_to_token(i) in ("<0xE6>", "\u00e6")][:1]
    assert tok.decode(lone) == ref.decode(lone, skip_special_tokens=True)


@pytest.mark.parametrize("kind", KINDS)
def test_decode_round_trip(kind, toks):
    tok = toks[kind]
    for s in STRINGS:
        expected = unicodedata.normalize("NFC", s) if kind == "qwen" else s  # Qwen2 normalises to NFC
        if kind == "sentencepiece" and s.startswith(" "):
            # Non-legacy Llama convention (transformers too): the decoder strips one leading space.
            expected = s[1:]
        if kind == "sentencepiece" and "\u2581" in s:
            continue  # sentencepiece writes spaces as U+2581, so a literal one decodes to a space
        assert tok.decode(tok.encode(s)) == expected, s
    # Special tokens survive only when asked for.
    s = {"qwen": "<|im_start|>hi<|im_end|>", "llama": "<|begin_of_text|>hi<|eot_id|>",
         "sentencepiece": "<s>hi</s>"}[kind]
    assert tok.decode(tok.encode(s), skip_special_tokens=False) == s
    assert tok.decode(tok.encode(s)) == "hi"


def test_decode_accepts_arrays_and_rejects_bad_ids(toks):
    import numpy as np

    tok = toks["qwen"]
    ids = tok.encode("hello world")
    assert tok.decode(np.asarray(ids, np.int32)) == "hello world"
    with pytest.raises(TokenizerError, match=rf"token id {tok.vocab_size} is out of range"):
        tok.decode(ids + [tok.vocab_size])
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(TokenizerError, match="expects a str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_stop_ids(toks, refs):
    q, ll, sp = toks["qwen"], toks["llama"], toks["sentencepiece"]
    assert q.eos_ids == {q.token_to_id("<|im_end|>"), q.token_to_id("<|endoftext|>")}
    assert q.bos_id is None and q.pad_id == q.token_to_id("<|endoftext|>")
    assert ll.eos_ids == {ll.token_to_id(t) for t in ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")}
    assert ll.eos_id == ll.token_to_id("<|eot_id|>") and ll.pad_id == ll.eos_id  # no pad token: falls back to EOS
    assert sp.eos_ids == {2} and sp.bos_id == 1 and sp.pad_id == 2


def test_chat_terminator_is_a_stop_id_without_generation_config(tmp_path):
    fx.make_hf_tokenizer(tmp_path, "qwen", generation_config=False)
    tok = load_tokenizer(tmp_path)
    assert tok.eos_ids == {tok.token_to_id("<|im_end|>")}  # eos_token itself; <|im_end|> also from the template
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|endoftext|>"  # a base model's config: the template's terminator still stops a chat
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_id == tok.token_to_id("<|endoftext|>")
    assert tok.eos_ids == {tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")}


# ------------------------------------------------------------------------------------------------- class rebuilds


def test_qwen2_class_pipeline_applies_over_the_file(tmp_path):
    """transformers' Qwen2Tokenizer uses its own NFC normaliser whatever tokenizer.json says; so do we."""
    fx.make_hf_tokenizer(tmp_path, "qwen")
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["normalizer"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    ref, tok = AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)
    for s in ["e\u0301 combining", "A\u030a", "Café"]:
        assert tok.encode(s) == ref(s, add_special_tokens=False)["input_ids"]
    assert tok.encode("e\u0301") == tok.encode("\u00e9")


def test_llama2_style_tokenizer_json_matches_transformers(tmp_path, dirs):
    """A Llama-2 tokenizer.json (sentencepiece BPE written out by transformers, with the legacy normaliser of the
    original files) gets transformers 5's non-legacy LlamaTokenizer pipeline."""
    saved = tmp_path / "saved"
    AutoTokenizer.from_pretrained(dirs["sentencepiece"]).save_pretrained(saved)
    assert (saved / "tokenizer.json").exists()
    spec = json.loads((saved / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                              {"type": "Replace", "pattern": {"String": " "},
                                                               "content": "\u2581"}]}
    spec["pre_tokenizer"] = None
    (saved / "tokenizer.json").write_text(json.dumps(spec))
    ref, tok = AutoTokenizer.from_pretrained(saved), load_tokenizer(saved)
    assert tok.kind == "hf"
    for s in STRINGS + SPECIAL_STRINGS:
        assert tok.encode(s) == ref(s, add_special_tokens=False)["input_ids"], s
        ids = ref(s)["input_ids"]
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), s
    # ... and the ids equal those of the sentencepiece model the file came from.
    sp = load_tokenizer(dirs["sentencepiece"])
    assert all(tok.encode(s) == sp.encode(s) for s in STRINGS + SPECIAL_STRINGS)


# ------------------------------------------------------------------------------------------------- chat templates


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_matches_transformers(kind, generation_prompt, refs, toks):
    ref, tok = refs[kind], toks[kind]
    for messages in MESSAGES:
        expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        got = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt)
        assert got == expected
        assert tok.encode(got) == ref.apply_chat_template(messages, tokenize=True, return_dict=False,
                                                          add_generation_prompt=generation_prompt)


def test_chat_template_kwargs_and_tools_match_transformers(refs, toks):
    tools = [{"type": "function", "function": {"name": "add", "description": "Adds <two> numbers & more",
                                               "parameters": {"a": "int", "b": "int"}}}]
    messages = MESSAGES[1]
    assert (toks["qwen"].apply_chat_template(messages, tools=tools)
            == refs["qwen"].apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True))
    assert (toks["llama"].apply_chat_template(messages, date_string="01 Jan 2025")
            == refs["llama"].apply_chat_template(messages, date_string="01 Jan 2025", tokenize=False,
                                                 add_generation_prompt=True))


def test_chat_template_raise_exception(refs, toks):
    bad = [{"role": "assistant", "content": "I speak first"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="must alternate"):
        refs["llama"].apply_chat_template(bad, tokenize=False)
    with pytest.raises(ChatTemplateError, match="must alternate"):
        toks["llama"].apply_chat_template(bad)
    with pytest.raises(ChatTemplateError, match="non-empty"):
        toks["qwen"].apply_chat_template([])


def test_chat_template_sources(tmp_path):
    """chat_template.jinja wins over tokenizer_config.json; a template that does not compile is a named error."""
    fx.make_hf_tokenizer(tmp_path, "qwen")
    # Block tags on their own indented lines: trim_blocks/lstrip_blocks decide the whitespace.
    template = ("{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.role }}]{{ m.content | tojson }}\n"
                "    {% else %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}\n"
                "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}")
    (tmp_path / "chat_template.jinja").write_text(template)
    tok = load_tokenizer(tmp_path)
    messages = [{"role": "user", "content": "x <&> é"}, {"role": "assistant", "content": "y"}]
    expected = '[user]"x <&> é"\ny\n2'
    assert tok.apply_chat_template(messages) == expected
    assert AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(messages, tokenize=False) == expected
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_render_prompt(toks, refs):
    tok = toks["qwen"]
    assert PLAIN_TEMPLATE == "\n\nHuman: {prompt}\n\nAssistant: "
    assert tok.render_prompt("What is 2+2?") == "\n\nHuman: What is 2+2?\n\nAssistant: "
    assert tok.render_prompt("{x} {prompt}", "plain") == "\n\nHuman: {x} {prompt}\n\nAssistant: "
    assert tok.render_prompt("hi", "Q: {prompt}\nA:") == "Q: hi\nA:"
    for kind in KINDS:
        assert toks[kind].render_prompt("hi there", "chat") == refs[kind].apply_chat_template(
            [{"role": "user", "content": "hi there"}], tokenize=False, add_generation_prompt=True)
    with pytest.raises(TokenizerError, match="unknown prompt template 'fancy'"):
        tok.render_prompt("hi", "fancy")


def test_encode_prompt_has_bos_once(toks, refs):
    for kind in KINDS:
        tok, ref = toks[kind], refs[kind]
        plain = tok.render_prompt("2+2?")
        assert tok.encode_prompt("2+2?") == ref(plain)["input_ids"]  # BOS added where the tokenizer has one
        chat = ref.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=True, return_dict=False,
                                       add_generation_prompt=True)
        assert tok.encode_prompt("2+2?", "chat") == chat  # the template writes its own BOS
        if tok.bos_id is not None:
            assert tok.encode_prompt("2+2?", "chat").count(tok.bos_id) == 1


def test_render_prompt_chat_without_template(tmp_path):
    fx.make_sentencepiece(tmp_path, chat_template=False)
    tok = load_tokenizer(tmp_path)
    assert tok.chat_template is None
    assert tok.render_prompt("x") == PLAIN_TEMPLATE.replace("{prompt}", "x")
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        tok.render_prompt("x", "chat")


# ------------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("kind", KINDS)
def test_save_round_trip(kind, toks, tmp_path):
    tok = toks[kind]
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.kind == tok.kind
    assert again.get_vocab() == tok.get_vocab()
    assert (again.bos_id, again.eos_id, again.pad_id, again.eos_ids) == (tok.bos_id, tok.eos_id, tok.pad_id,
                                                                        tok.eos_ids)
    assert again.chat_template == tok.chat_template
    ref = AutoTokenizer.from_pretrained(tmp_path)
    assert len(ref) == tok.vocab_size
    for s in STRINGS + SPECIAL_STRINGS:
        assert again.encode(s) == tok.encode(s) == ref(s, add_special_tokens=False)["input_ids"], s
        assert again.encode(s, add_bos=True) == ref(s)["input_ids"], s
    assert again.apply_chat_template(MESSAGES[1]) == ref.apply_chat_template(MESSAGES[1], tokenize=False,
                                                                             add_generation_prompt=True)


def test_save_keeps_a_models_generation_config(toks, tmp_path):
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 5, "do_sample": true}')
    toks["qwen"].save(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"eos_token_id": 5, "do_sample": True}


def test_load_from_file_path(dirs, toks):
    for kind, name in (("qwen", "tokenizer.json"), ("sentencepiece", "tokenizer.model")):
        tok = load_tokenizer(os.path.join(dirs[kind], name))
        assert tok.get_vocab() == toks[kind].get_vocab() and tok.eos_ids == toks[kind].eos_ids


def test_missing_and_bad_files(tmp_path, dirs):
    missing = tmp_path / "nope"
    with pytest.raises(TokenizerError, match="does not exist") as e:
        load_tokenizer(missing)
    assert str(missing) in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert not has_tokenizer(empty) and not has_tokenizer(missing)
    assert has_tokenizer(dirs["qwen"]) and has_tokenizer(dirs["sentencepiece"])
    with pytest.raises(TokenizerError, match=r"no tokenizer in .*tokenizer\.json.*tokenizer\.model.*config\.json"):
        load_tokenizer(empty)
    (empty / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(TokenizerError, match="unsupported tokenizer file"):
        load_tokenizer(empty / "vocab.txt")
    (empty / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(TokenizerError, match="as a Hugging Face tokenizer.json"):
        load_tokenizer(empty)
    os.remove(empty / "tokenizer.json")
    (empty / "tokenizer.model").write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(TokenizerError, match="not a valid sentencepiece model"):
        load_tokenizer(empty)
    bad_cfg = tmp_path / "badcfg"
    shutil.copytree(dirs["qwen"], bad_cfg)
    (bad_cfg / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        load_tokenizer(bad_cfg)


def test_sentencepiece_save_refuses_to_be_shadowed(toks, dirs, tmp_path):
    shutil.copy(os.path.join(dirs["qwen"], "tokenizer.json"), tmp_path / "tokenizer.json")
    with pytest.raises(TokenizerError, match="shadow"):
        toks["sentencepiece"].save(tmp_path)


# ------------------------------------------------------------------------------------------------- training


def test_train_sentencepiece_matches_transformers_and_round_trips(trained):
    texts, d, tok = trained
    assert isinstance(tok, Tokenizer) and tok.kind == "sentencepiece"
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 400
    assert sorted(os.listdir(d)) == ["tokenizer.model", "tokenizer_config.json"]
    loaded = load_tokenizer(d)
    assert loaded.get_vocab() == tok.get_vocab()
    ref = AutoTokenizer.from_pretrained(d)
    for s in STRINGS + texts[:40] + ["a<|sep|>b", "<s>x</s><pad>"]:
        ids = tok.encode(s)
        exact = s.replace("\u2581", " ")  # sentencepiece's space symbol is the one character that cannot round-trip
        assert ids == loaded.encode(s) == ref(s, add_special_tokens=False)["input_ids"], s
        assert tok.encode(s, add_bos=True) == ref(s)["input_ids"] == [1] + ids
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids) == exact  # exact: no dummy prefix
    # Digits are single tokens; user symbols are atomic; no text is ever <unk> (byte fallback).
    assert [tok.id_to_token(i) for i in tok.encode("90817")] == list("90817")
    assert tok.encode("x<|sep|>y")[1] == tok.token_to_id("<|sep|>")
    assert all(tok.unk_id not in tok.encode(s) for s in STRINGS)
    # A prompt and its answer tokenise the same apart and together when the answer starts with a space.
    prompt = "\n\nHuman: What is 12 + 30?\n\nAssistant:"
    assert tok.encode(prompt + " 42") == tok.encode(prompt) + tok.encode(" 42")


def test_train_sentencepiece_is_deterministic(trained, tmp_path):
    texts, d, _ = trained
    train_sentencepiece(texts, 400, tmp_path / "again", user_defined_symbols=["<|sep|>"])
    with open(os.path.join(d, "tokenizer.model"), "rb") as f:
        assert (tmp_path / "again" / "tokenizer.model").read_bytes() == f.read()
    other = train_sentencepiece(texts[:300], 320, tmp_path / "other", seed=1)
    assert other.vocab_size == 320


def test_train_sentencepiece_bad_input(tmp_path):
    with pytest.raises(TokenizerError, match="too small"):
        train_sentencepiece(["abc"], 200, tmp_path)
    with pytest.raises(TokenizerError, match="no non-empty text"):
        train_sentencepiece(["", ""], 300, tmp_path)
    with pytest.raises(TokenizerError, match="expects strings"):
        train_sentencepiece([b"abc"], 300, tmp_path)  # type: ignore[list-item]


# ------------------------------------------------------------------------------------------------- compatibility


def test_compatible_twins_with_padded_rows(tmp_path, toks):
    fx.make_hf_tokenizer(tmp_path / "a", "qwen")
    fx.make_hf_tokenizer(tmp_path / "b", "qwen", generation_config=False)
    a, b = load_tokenizer(tmp_path / "a"), load_tokenizer(tmp_path / "b")
    n = a.vocab_size
    check_vocab_compatible(a, b)
    check_vocab_compatible(a, b, proposal_rows=n + 29, aligner_rows=n + 157)  # padded embeddings differ
    check_vocab_compatible(a, b, proposal_rows=n, aligner_rows=n)
    with pytest.raises(VocabMismatchError, match=rf"aligner embedding has {n - 1} rows but its tokenizer has {n}"):
        check_vocab_compatible(a, b, aligner_rows=n - 1)
    with pytest.raises(VocabMismatchError, match="proposal embedding"):
        check_vocab_compatible(a, b, proposal_rows=3)
    # A sentencepiece tokenizer and its transformers-written tokenizer.json are the same vocabulary.
    saved = tmp_path / "sp_json"
    toks["sentencepiece"].save(tmp_path / "sp")
    AutoTokenizer.from_pretrained(tmp_path / "sp").save_pretrained(saved)
    if (saved / "tokenizer.model").exists():
        os.remove(saved / "tokenizer.model")
    check_vocab_compatible(toks["sentencepiece"], load_tokenizer(saved))


def test_incompatible_vocabularies_name_the_first_differing_id(refs, toks):
    vq = refs["qwen"].convert_ids_to_tokens(list(range(len(refs["qwen"]))))
    vl = refs["llama"].convert_ids_to_tokens(list(range(len(refs["llama"]))))
    first = next(i for i, (x, y) in enumerate(zip(vq, vl)) if x != y)
    with pytest.raises(VocabMismatchError) as e:
        check_vocab_compatible(toks["qwen"], toks["llama"], proposal_rows=640, aligner_rows=640)
    msg = str(e.value)
    assert f"first differing ids: id {first}: proposal {vq[first]!r} vs aligner {vl[first]!r}" in msg
    assert f"proposal {len(vq)} ids" in msg and f"aligner {len(vl)} ids" in msg
    assert "same tokenizer family" in msg
    assert isinstance(e.value, ValueError)


def test_extra_added_token_is_a_mismatch(tmp_path, dirs):
    shutil.copytree(dirs["qwen"], tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "tokenizer_config.json").read_text())
    cfg["additional_special_tokens"].append("<|new_tool|>")
    (tmp_path / "q" / "tokenizer_config.json").write_text(json.dumps(cfg))
    ref, extended = AutoTokenizer.from_pretrained(tmp_path / "q"), load_tokenizer(tmp_path / "q")
    base = load_tokenizer(dirs["qwen"])
    assert extended.vocab_size == len(ref) == base.vocab_size + 1
    assert extended.token_to_id("<|new_tool|>") == ref.convert_tokens_to_ids("<|new_tool|>") == base.vocab_size
    assert extended.encode("a<|new_tool|>b") == ref("a<|new_tool|>b", add_special_tokens=False)["input_ids"]
    with pytest.raises(VocabMismatchError, match=rf"ids {base.vocab_size}\.\. exist only in the aligner"):
        check_vocab_compatible(base, extended)
