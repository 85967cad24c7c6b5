"""The data pipeline: formats, masks by hand, truncation, packing, determinism, resume and host sharding."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ramjax import data as D
from ramjax.config import TrainConfig, load_config
from ramjax.data import DataError

KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


class CharTok:
    """Stand-in with the ``ramjax.tokenizer.Tokenizer`` interface: one id per character (``ord(c) + 3``),
    ``<s>`` = 1 (BOS), ``</s>`` = 2 (EOS), pad 0. Plain template ``Q:{prompt}A:``; chat template
    ``<s>[r]content</s>...`` with generation prompt ``[a]``."""

    eos_id = 2
    pad_id = 0

    def __init__(self, bos: bool = True):
        self.bos_id = 1 if bos else None

    def encode(self, text, *, add_bos=False):
        ids, i = [], 0
        while i < len(text):
            if text.startswith("<s>", i):
                ids.append(1)
                i += 3
            elif text.startswith("</s>", i):
                ids.append(2)
                i += 4
            else:
                ids.append(ord(text[i]) + 3)
                i += 1
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def render_prompt(self, prompt, template="plain"):
        if template == "plain":
            return f"Q:{prompt}A:"
        return self.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)

    def apply_chat_template(self, messages, *, add_generation_prompt=True):
        text = "<s>" + "".join(f"[{m['role'][0]}]{m['content']}</s>" for m in messages)
        return text + ("[a]" if add_generation_prompt else "")


def ids(text):
    return [ord(c) + 3 for c in text]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def tokenize(tmp_path, rows, tok=None, **kw):
    recs = D.read_jsonl(write_jsonl(tmp_path / "d.jsonl", rows))
    return D.tokenize_records(recs, tok or CharTok(), **kw)


def one_batch(data, batch_size=None, **kw):
    it = D.BatchIterator(data, batch_size or len(data), shuffle=False, process_index=0, process_count=1, **kw)
    return next(it)


# ------------------------------------------------------------------------------------------------------------
# Formats


def test_each_format_parses_and_is_detected(tmp_path):
    cases = {
        "sft": {"prompt": "p", "response": "r"},
        "chat": {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
        "preference": {"prompt": "p", "chosen": "c", "rejected": "r"},
        "text": {"text": "hello"},
        "proposal_samples": {"prompt": "p", "response": "r", "proposal": "s", "id": 7},
    }
    for fmt, row in cases.items():
        recs = D.read_jsonl(write_jsonl(tmp_path / f"{fmt}.jsonl", [row, row]))
        assert [r.format for r in recs] == [fmt, fmt]
        assert recs[0].where == f"{tmp_path / f'{fmt}.jsonl'}:1" and recs[1].where.endswith(":2")
    assert D.read_jsonl(write_jsonl(tmp_path / "x.jsonl", [cases["proposal_samples"]]))[0].data["id"] == 7  # kept
    # Alpaca fields read as sft; a list of proposal samples uses the first; field_map renames
    alp = D.read_jsonl(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "do", "input": "this", "output": "ok"}]))[0]
    assert (alp.format, alp.data["prompt"], alp.data["response"]) == ("sft", "do\n\nthis", "ok")
    many = D.read_jsonl(write_jsonl(tmp_path / "m.jsonl", [{"prompt": "p", "response": "r", "proposal": ["a", "b"]}]))
    assert many[0].data["proposal"] == "a"
    renamed = D.read_jsonl(write_jsonl(tmp_path / "r.jsonl", [{"q": "p", "a": "r"}]), field_map={"q": "prompt",
                                                                                                 "a": "response"})
    assert renamed[0].format == "sft" and renamed[0].data["prompt"] == "p"
    # an explicit format forces its fields
    with pytest.raises(DataError, match=r"sft.jsonl:1: field 'chosen' is missing \(format preference"):
        D.read_jsonl(str(tmp_path / "sft.jsonl"), format="preference")


@pytest.mark.parametrize("line, match", [
    ('{"prompt": "p", "response": "r"', r"d.jsonl:2: not valid JSON"),
    ('{"prompt": "p"}', r"d.jsonl:2: field 'response' is missing \(format sft"),
    ('{"prompt": 3, "response": "r"}', r"d.jsonl:2: field 'prompt' must be a str, got int"),
    ('["prompt", "response"]', r"d.jsonl:2: each line must be a JSON object, got list"),
])
def test_malformed_line_names_file_line_and_field(tmp_path, line, match):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, line])
    with pytest.raises(DataError, match=match):
        D.read_jsonl(path)


def test_malformed_chat_and_proposal_records(tmp_path):
    bad = [
        ({"messages": [{"role": "user", "content": 5}]}, r":1: field 'messages\[0\].content' must be a str, got int"),
        ({"messages": [{"role": "user"}]}, r":1: field 'messages\[0\].content' is missing"),
        ({"messages": [{"role": "user", "content": "u"}]}, r":1: field 'messages' has no assistant turn"),
        ({"messages": "hi"}, r":1: field 'messages' must be a list, got str"),
        ({"prompt": "p", "response": "r", "proposal": 3}, r":1: field 'proposal' must be a str, got int"),
        ({"prompt": "p", "proposal": "s"}, r":1: field 'response' is missing \(format proposal_samples"),
        ({"foo": 1}, r":1: cannot tell the format from the fields \['foo'\]"),
    ]
    for row, match in bad:
        with pytest.raises(DataError, match=match):
            D.read_jsonl(write_jsonl(tmp_path / "bad.jsonl", [row]))
    with pytest.raises(DataError, match="not found"):
        D.read_jsonl(str(tmp_path / "missing.jsonl"))


# ------------------------------------------------------------------------------------------------------------
# Masks and truncation, by hand


def test_sft_masks_by_hand(tmp_path):
    data = tokenize(tmp_path, [{"prompt": "hi", "response": "yo"}], max_len=16, max_prompt_len=8)
    b = one_batch(data)
    seq = [1] + ids("Q:hiA:") + ids("yo") + [2]  # BOS, plain template, response, EOS
    T = 16
    np.testing.assert_array_equal(b["tokens"][0], seq + [0] * (T - 10))
    np.testing.assert_array_equal(b["targets"][0], seq[1:] + [0] * (T - 9))
    # prompt masked; the targets y, o and EOS count
    np.testing.assert_array_equal(b["loss_mask"][0], [0] * 6 + [1, 1, 1] + [0] * (T - 9))
    np.testing.assert_array_equal(b["segment_ids"][0], [1] * 10 + [0] * (T - 10))
    np.testing.assert_array_equal(b["positions"][0], list(range(10)) + [0] * (T - 10))
    assert b["example_index"].tolist() == [0]
    assert {k: b[k].dtype for k in KEYS} == {"tokens": np.int32, "targets": np.int32, "loss_mask": np.float32,
                                             "segment_ids": np.int32, "positions": np.int32}
    assert data.stats.as_dict() == {"read": 1, "kept": 1, "skipped_empty": 0, "truncated_prompts": 0,
                                    "truncated_responses": 0, "split_documents": 0, "tokens": 10, "loss_tokens": 3}
    # the chat template for a prompt/response record: the assistant turn as the template writes it (its </s> is EOS)
    b = one_batch(tokenize(tmp_path, [{"prompt": "hi", "response": "yo"}], template="chat", max_len=16,
                           max_prompt_len=12))
    seq = [1] + ids("[u]hi") + [2] + ids("[a]yo") + [2]
    np.testing.assert_array_equal(b["tokens"][0, :len(seq)], seq)
    np.testing.assert_array_equal(b["loss_mask"][0, :len(seq)], [0] * 9 + [1, 1, 1, 0])


def test_chat_loss_on_assistant_turns_only(tmp_path):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"}]
    # chat template: <s>[s]S</s>[u]u1</s>[a]a1</s>[u]u2</s>[a]a2</s>; assistant spans a1</s> and a2</s>
    data = tokenize(tmp_path, [{"messages": msgs}], template="chat", max_len=64, max_prompt_len=32)
    seq = data.examples[0]
    pieces = [([1] + ids("[s]S") + [2] + ids("[u]u1") + [2] + ids("[a]"), False), (ids("a1") + [2], True),
              (ids("[u]u2") + [2] + ids("[a]"), False), (ids("a2") + [2], True)]
    want_tokens = [t for p, _ in pieces for t in p]
    want_target = [f for p, f in pieces for _ in p]
    assert seq.tokens.tolist() == want_tokens  # one BOS although the template writes one and encode adds one
    assert seq.target.tolist() == want_target  # the template's </s> ends the turn: no second EOS
    # plain template: system text, Q:..A: per user turn, assistant contents; EOS after the last turn only
    seq = tokenize(tmp_path, [{"messages": msgs}], template="plain", max_len=64, max_prompt_len=32).examples[0]
    pieces = [([1] + ids("S") + ids("Q:u1A:"), False), (ids("a1"), True), (ids("Q:u2A:"), False),
              (ids("a2") + [2], True)]
    assert seq.tokens.tolist() == [t for p, _ in pieces for t in p]
    assert seq.target.tolist() == [f for p, f in pieces for _ in p]
    b = one_batch(D.TokenizedData("single", [seq], ["x"], D.DataStats(), 64, 0))
    assert b["loss_mask"][0].sum() == 2 + 3  # a1 (2 tokens) + a2 and EOS (3)


def test_truncation_counts_and_empty_response_skip(tmp_path):
    rows = [
        {"prompt": "abcdefghij", "response": "xy"},  # prompt 1+12 tokens > 8: cut from the left, BOS kept
        {"prompt": "a", "response": "abcdefghijklmnop"},  # response cut to fit: no EOS at the end
        {"prompt": "sh", "response": "ok"},  # fits
    ]
    data = tokenize(tmp_path, rows, max_len=12, max_prompt_len=8)
    st = data.stats
    assert (st.read, st.kept, st.truncated_prompts, st.truncated_responses, st.skipped_empty) == (3, 3, 1, 1, 0)
    s0, s1, s2 = data.examples
    assert s0.tokens.tolist() == [1] + ids("Q:abcdefghijA:")[-7:] + ids("xy") + [2]
    assert s0.target.tolist() == [False] * 8 + [True] * 3
    assert s1.tokens.tolist() == [1] + ids("Q:aA:") + ids("abcdef") and 2 not in s1.tokens.tolist()
    assert len(s1) == 12 and s1.target.sum() == 6
    assert len(s2) == 1 + 6 + 3
    # a prompt that fills max_len leaves no response token: skipped and counted, never trained on
    data = tokenize(tmp_path, rows[1:] + [{"prompt": "x" * 20, "response": "r"}], max_len=12, max_prompt_len=12)
    assert (data.stats.read, data.stats.kept, data.stats.skipped_empty, data.stats.truncated_prompts) == (3, 2, 1, 1)
    assert all(s.target.any() for s in data.examples) and [w[-2:] for w in data.where] == [":1", ":2"]
    with pytest.raises(DataError, match="no usable examples"):
        tokenize(tmp_path, [{"prompt": "x" * 20, "response": "r"}], max_len=12, max_prompt_len=12)


def test_pairs_share_the_prompt(tmp_path):
    rows = [{"prompt": "p", "chosen": "good", "rejected": "bad", "proposal": "meh"}]
    # dpo / ram with rejected negatives: (chosen, rejected); ram with proposal negatives: (response, proposal)
    data = tokenize(tmp_path, [{"prompt": "p", "chosen": "good", "rejected": "bad"}], kind="pair",
                    negatives="rejected", max_len=16, max_prompt_len=8)
    b = one_batch(data)
    prompt = [1] + ids("Q:pA:")
    assert b["chosen_tokens"][0, :11].tolist() == prompt + ids("good") + [2]
    assert b["rejected_tokens"][0, :10].tolist() == prompt + ids("bad") + [2]
    assert b["chosen_loss_mask"][0].sum() == 5 and b["rejected_loss_mask"][0].sum() == 4
    assert set(b) == {f"{p}_{k}" for p in ("chosen", "rejected") for k in KEYS} | {"example_index"}
    prop = [{"prompt": "p", "response": "yes", "proposal": "no", "proposal_token_ids": [50, 51]}]
    data = tokenize(tmp_path, prop, kind="pair", negatives="proposal", max_len=16, max_prompt_len=8)
    (a, n), = data.examples
    assert a.tokens.tolist() == prompt + ids("yes") + [2]
    assert n.tokens.tolist() == prompt + [50, 51, 2]  # the sampled ids as written by sample.py, EOS appended
    with pytest.raises(DataError, match=r"needs? the field 'proposal'.*set ram.negatives=rejected"):
        tokenize(tmp_path, [{"prompt": "p", "chosen": "c", "rejected": "r"}], kind="pair", negatives="proposal",
                 max_len=16, max_prompt_len=8)
    with pytest.raises(DataError, match=r"field 'rejected' is missing"):
        tokenize(tmp_path, [{"prompt": "p", "response": "r", "proposal": "s"}], kind="pair", negatives="rejected",
                 max_len=16, max_prompt_len=8)
    # one truncated prompt is shared by both; a pair is skipped when either response is left empty
    data = tokenize(tmp_path, [{"prompt": "p" * 30, "chosen": "c", "rejected": "r"}], kind="pair",
                    negatives="rejected", max_len=12, max_prompt_len=10)
    (c, r), = data.examples
    assert c.tokens[:10].tolist() == r.tokens[:10].tolist() and c.tokens[0] == 1
    # a sample.py file made from preference data serves either negatives; y_data is its chosen response
    for negatives, neg in (("proposal", "meh"), ("rejected", "bad")):
        (a, n), = tokenize(tmp_path, rows, kind="pair", negatives=negatives, max_len=16, max_prompt_len=8).examples
        assert a.tokens.tolist() == prompt + ids("good") + [2] and n.tokens.tolist() == prompt + ids(neg) + [2]


def test_text_documents_are_chunked_without_losing_targets(tmp_path):
    text = "abcdefghijklmnopqrstuvwxyz"
    data = tokenize(tmp_path, [{"text": text}, {"text": "hi"}], max_len=8, max_prompt_len=4)
    full = [1] + ids(text) + [2]  # 28 tokens
    chunks = [s.tokens.tolist() for s in data.examples[:-1]]
    assert all(len(c) <= 8 for c in chunks) and data.stats.split_documents == 1
    # consecutive chunks overlap by one token; every token after the first is a target exactly once
    rebuilt = chunks[0] + [t for c in chunks[1:] for t in c[1:]]
    assert rebuilt == full
    assert sum(int(s.target[1:].sum()) for s in data.examples[:-1]) == len(full) - 1
    assert data.examples[-1].tokens.tolist() == [1] + ids("hi") + [2]


# ------------------------------------------------------------------------------------------------------------
# Packing


def test_packing_segments_positions_and_masks(tmp_path):
    tok = CharTok(bos=False)
    rows = [{"text": "abc"}, {"text": "def"}, {"text": "ghi"}, {"text": "jk"}, {"text": "lmnop"}]  # 4 4 4 3 6 tokens
    data = tokenize(tmp_path, rows, tok=tok, max_len=10, max_prompt_len=5)
    b = one_batch(data, batch_size=3, packing=True)
    # first fit: [abc, def] (8, 2 left), [ghi, jk] (7), [lmnop] (6)
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 1, 2, 2, 2, 2, 0, 0],
                                                     [1, 1, 1, 1, 2, 2, 2, 0, 0, 0],
                                                     [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 3, 0, 1, 2, 3, 0, 0])
    np.testing.assert_array_equal(b["positions"][1], [0, 1, 2, 3, 0, 1, 2, 0, 0, 0])
    np.testing.assert_array_equal(b["tokens"][0], ids("abc") + [2] + ids("def") + [2, 0, 0])
    # no target crosses a segment boundary; the last token of each segment predicts nothing
    np.testing.assert_array_equal(b["targets"][0], ids("bc") + [2, 0] + ids("ef") + [2, 0, 0, 0])
    np.testing.assert_array_equal(b["loss_mask"][0], [1, 1, 1, 0, 1, 1, 1, 0, 0, 0])
    assert "example_index" not in b
    # the positions agree with the model's own rule
    from ramjax.model import positions_from_segments
    np.testing.assert_array_equal(np.asarray(positions_from_segments(b["segment_ids"])), b["positions"])
    # pairs pack jointly: segment s of a row is the same example in chosen_* and rejected_*
    pref = [{"prompt": "p", "chosen": "c" * n, "rejected": "r" * (5 - n)} for n in (1, 2, 3, 4)]
    data = tokenize(tmp_path, pref, tok=tok, kind="pair", negatives="rejected", max_len=20, max_prompt_len=5)
    b = one_batch(data, batch_size=len(_rows_of(data, 20)), packing=True)
    for r in range(b["chosen_tokens"].shape[0]):
        for s in range(1, b["chosen_segment_ids"][r].max() + 1):
            c_tok = b["chosen_tokens"][r][b["chosen_segment_ids"][r] == s]
            r_tok = b["rejected_tokens"][r][b["rejected_segment_ids"][r] == s]
            n = int(np.sum(c_tok == ids("c")[0]))
            assert np.sum(r_tok == ids("r")[0]) == 5 - n and c_tok[:4].tolist() == r_tok[:4].tolist()


def _rows_of(data, max_len):
    lengths = np.asarray([[len(a), len(b)] for a, b in data.examples])
    return D._pack_rows(np.arange(len(data)), lengths, max_len, 128)


# ------------------------------------------------------------------------------------------------------------
# Order, resume, hosts


def _dataset(n=23, max_len=24):
    tok = CharTok()
    recs = [D.Record(f"f:{i}", "sft", {"prompt": f"p{i}", "response": "r" * (1 + i % 7)}) for i in range(n)]
    return D.tokenize_records(recs, tok, max_len=max_len, max_prompt_len=8)


def _take(it, k):
    return [next(it) for _ in range(k)]


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("packing", [False, True])
def test_determinism_and_resume_state(packing):
    data = _dataset()
    def mk(seed=0):
        return D.BatchIterator(data, 4, seed=seed, packing=packing, process_index=0, process_count=1)

    it = mk()
    per_epoch = it.batches_per_epoch()
    first = _take(it, per_epoch * 2 + 3)  # crosses two epoch boundaries
    again = _take(mk(), per_epoch * 2 + 3)
    assert all(_equal(a, b) for a, b in zip(first, again))
    # epochs are different permutations; another seed gives another order
    key = "segment_ids" if packing else "example_index"
    assert not all(_equal(a, b) for a, b in zip(first[:per_epoch], first[per_epoch:2 * per_epoch]))
    assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(first, _take(mk(seed=1), len(first))))
    # resume: state after k batches, restored in a fresh iterator, gives exactly the following batches
    for k in (0, 1, per_epoch - 1, per_epoch, per_epoch + 2):
        it = mk()
        _take(it, k)
        state = json.loads(json.dumps(it.state()))  # small and JSON-serialisable (goes into checkpoints)
        assert set(state) == {"epoch", "position"}
        rest = _take(it, 6)
        fresh = mk()
        fresh.restore(state)
        assert all(_equal(a, b) for a, b in zip(rest, _take(fresh, 6))), (k, key)
    with pytest.raises(DataError, match="out of range"):
        mk().restore({"epoch": 0, "position": 10 ** 6})
    with pytest.raises(DataError, match="must be"):
        mk().restore({"step": 3})


def test_every_example_once_per_epoch_without_drop():
    data = _dataset()
    it = D.BatchIterator(data, 4, seed=3, drop_remainder=False, num_epochs=1, process_index=0, process_count=1)
    batches = list(it)
    assert len(batches) == 6  # 23 examples -> 5 full batches + 3 examples and one empty row
    seen = np.concatenate([b["example_index"] for b in batches])
    assert sorted(seen[seen >= 0].tolist()) == list(range(23)) and (seen == -1).sum() == 1
    empty = batches[-1]["segment_ids"][batches[-1]["example_index"] == -1]
    assert empty.sum() == 0
    # training drops the incomplete last batch so every host has the same number of full batches
    it = D.BatchIterator(data, 4, seed=3, process_index=0, process_count=1)
    assert it.batches_per_epoch() == 5


@pytest.mark.parametrize("packing", [False, True])
def test_host_shards_are_disjoint_and_cover_the_global_batch(packing):
    data = _dataset(n=40)
    G = 8
    single = D.BatchIterator(data, G, seed=5, packing=packing, drop_remainder=False, num_epochs=1,
                             process_index=0, process_count=1)
    global_batches = list(single)

    def row_keys(batch):
        # a row's identity: its tokens (rows are distinct here) -> count rows, not examples, when packing
        return sorted(map(tuple, batch["tokens"].tolist()))

    for count in (2, 4):
        hosts = [D.BatchIterator(data, G, seed=5, packing=packing, drop_remainder=False, num_epochs=1,
                                 process_index=h, process_count=count) for h in range(count)]
        per_host = [list(h) for h in hosts]
        assert all(len(p) == len(global_batches) for p in per_host)
        for b, gb in enumerate(global_batches):
            parts = [p[b] for p in per_host]
            assert all(x["tokens"].shape == (G // count, data.max_len) for x in parts)
            assert sorted(sum((row_keys(x) for x in parts), [])) == row_keys(gb)
            if not packing:
                idx = [set(x["example_index"][x["example_index"] >= 0].tolist()) for x in parts]
                assert sum(map(len, idx)) == len(set().union(*idx))  # disjoint
                assert set().union(*idx) == set(gb["example_index"][gb["example_index"] >= 0].tolist())
    with pytest.raises(DataError, match="multiple of the number of processes"):
        D.BatchIterator(data, 6, process_index=0, process_count=4)


def test_too_little_data_for_one_batch():
    with pytest.raises(DataError, match="fewer than one global batch of 64"):
        D.BatchIterator(_dataset(n=10), 64, process_index=0, process_count=1)


# ------------------------------------------------------------------------------------------------------------
# With real tokenizers and a TrainConfig


def test_with_real_tokenizers(tmp_path):
    from tokenizer_fixtures import make_hf_tokenizer

    from ramjax.tokenizer import load_tokenizer

    make_hf_tokenizer(tmp_path / "qwen", "qwen")
    make_hf_tokenizer(tmp_path / "llama", "llama")
    qwen, llama = load_tokenizer(tmp_path / "qwen"), load_tokenizer(tmp_path / "llama")
    row = {"prompt": "what is the answer", "response": "hello world"}
    for tok in (qwen, llama):
        seq = tokenize(tmp_path, [row], tok=tok, max_len=128, max_prompt_len=64).examples[0]
        prompt = tok.encode(tok.render_prompt(row["prompt"], "plain"), add_bos=True)
        assert seq.tokens.tolist() == prompt + tok.encode(" " * 0 + row["response"]) + [tok.eos_id]
        assert seq.target.tolist() == [False] * len(prompt) + [True] * (len(seq) - len(prompt))
        assert D.encode_prompt(tok, row["prompt"], "plain") == prompt
    assert llama.bos_id is not None and qwen.bos_id is None
    from tokenizer_fixtures import make_sentencepiece
    make_sentencepiece(tmp_path / "sp")
    sp = load_tokenizer(tmp_path / "sp")
    for tok in (qwen, llama, sp):  # the same prompt tokens as the tokenizer's own rule (used when sampling)
        for template in ("plain", "chat"):
            assert D.encode_prompt(tok, "what is the answer", template) == tok.encode_prompt("what is the answer",
                                                                                              template)
    # chat: the assistant turn of ChatML ends with <|im_end|>, one of qwen's stop ids: no extra EOS
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the answer"}]
    seq = tokenize(tmp_path, [{"messages": msgs}], tok=qwen, template="chat", max_len=128,
                   max_prompt_len=64).examples[0]
    trained = seq.tokens[seq.target].tolist()
    assert qwen.decode(trained, skip_special_tokens=False) == "the answer<|im_end|>\n"
    assert seq.tokens.tolist() == qwen.encode(qwen.apply_chat_template(msgs, add_generation_prompt=False))
    n_prompt = int(np.argmax(seq.target))
    assert seq.tokens[:n_prompt].tolist() == D.encode_prompt(qwen, msgs[:1], "chat")
    # llama's template writes <|begin_of_text|> itself: exactly one BOS
    seq = tokenize(tmp_path, [{"messages": msgs}], tok=llama, template="chat", max_len=256,
                   max_prompt_len=200).examples[0]
    assert seq.tokens[0] == llama.bos_id and seq.tokens[1] != llama.bos_id
    assert llama.decode(seq.tokens[seq.target].tolist(), skip_special_tokens=False) == "the answer<|eot_id|>"


def test_padding_longest_rows_follow_the_data(tmp_path):
    rows = [{"prompt": "p", "chosen": "g" * n, "rejected": "bad"} for n in (1, 4, 9)]
    full = tokenize(tmp_path, rows, kind="pair", negatives="rejected", max_len=64, max_prompt_len=8)
    short = tokenize(tmp_path, rows, kind="pair", negatives="rejected", max_len=64, max_prompt_len=8,
                     padding="longest")
    longest = len([1] + ids("Q:pA:") + ids("g" * 9) + [2])  # 16 tokens
    assert full.max_len == 64 and short.max_len == 16 == longest
    a, b = one_batch(full, batch_size=3), one_batch(short, batch_size=3)
    for k in b:  # the same rows, without the 48 columns of padding
        assert np.array_equal(a[k][:, :16] if a[k].ndim == 2 else a[k], b[k]), k
        if a[k].ndim == 2 and k.endswith(("loss_mask", "segment_ids")):
            assert not a[k][:, 16:].any(), k
    rows[2]["chosen"] = "g" * 10  # 17 tokens: rounded up to the next multiple of 8, at most max_len
    for max_len, row_len in ((64, 24), (20, 20)):
        assert tokenize(tmp_path, rows, kind="pair", negatives="rejected", max_len=max_len, max_prompt_len=8,
                        padding="longest").max_len == row_len
    with pytest.raises(Exception, match="data.padding=longest .* set data.packing=false"):
        load_config(TrainConfig, None, ["tokenizer=t", "data.packing=true", "data.padding=longest"])


def test_iterators_from_train_config(tmp_path):
    tok = CharTok()
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"prompt": f"p{i}", "response": "yes", "proposal": "no"}
                                                       for i in range(12)])
    pref = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"}
                                                 for i in range(12)])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "abc" * i} for i in range(1, 13)])
    common = ["tokenizer=t", "data.max_len=32", "data.max_prompt_len=16", "data.batch_size=4"]
    cfg = load_config(TrainConfig, None, common + ["stage=ram", f"data.train_files=[{samples}]",
                                                   f"data.eval_files=[{samples}]"])
    it = D.train_iterator(cfg, tok, process_index=0, process_count=1)
    b = next(it)
    assert b["chosen_tokens"].shape == (4, 32) and b["rejected_tokens"].shape == (4, 32)
    assert it.batches_per_epoch() == 3 and it.stats.kept == 12
    ev = D.eval_iterator(cfg, tok, process_index=0, process_count=1)
    assert sum(1 for _ in ev) == 3
    cfg = load_config(TrainConfig, None, common + ["stage=ram", "ram.negatives=rejected", f"data.train_files=[{pref}]"])
    assert next(D.train_iterator(cfg, tok, process_index=0, process_count=1))["rejected_loss_mask"].sum() == 4 * 2
    cfg = load_config(TrainConfig, None, common + ["stage=ram", f"data.train_files=[{pref}]"])
    with pytest.raises(DataError, match="set ram.negatives=rejected"):
        D.train_iterator(cfg, tok, process_index=0, process_count=1)
    cfg = load_config(TrainConfig, None, common + ["stage=pretrain", "data.packing=true", f"data.train_files=[{text}]"])
    b = next(D.train_iterator(cfg, tok, process_index=0, process_count=1))
    assert set(b) == set(KEYS) and b["segment_ids"].max() > 1
    cfg = load_config(TrainConfig, None, common + ["stage=sft", f"data.train_files=[{pref}]"])
    assert D.eval_iterator(cfg, tok) is None
    # pretraining on prompt/response records trains on every token
    cfg = load_config(TrainConfig, None, common + ["stage=pretrain", f"data.train_files=[{samples}]"])
    b = next(D.train_iterator(cfg, tok, process_index=0, process_count=1))
    assert np.array_equal(b["loss_mask"] > 0, (b["segment_ids"] > 0) & (np.roll(b["segment_ids"], -1, 1) > 0))


def test_optional_sources_say_what_to_install():
    for mod, call in (("tensorflow_datasets", lambda: D.read_tfds("x")), ("grain", lambda: D.read_grain(["x"]))):
        try:
            __import__(mod)
        except ImportError:
            with pytest.raises(ImportError, match="pip install"):
                call()


def test_tokenizer_errors_name_the_record(tmp_path):
    class Strict(CharTok):
        def apply_chat_template(self, messages, *, add_generation_prompt=True):
            if any(m["role"] == "system" for m in messages):
                raise ValueError("System role not supported")
            return super().apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    rows = [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                          {"role": "assistant", "content": "a"}]}]
    with pytest.raises(DataError, match=r"d.jsonl:2: System role not supported"):
        tokenize(tmp_path, rows, tok=Strict(), template="chat", max_len=64, max_prompt_len=32)
