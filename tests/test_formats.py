"""Standard dataset shapes read natively: TRL prompt/completion and prompt/chosen/rejected (strings or message
lists), chat messages, HH-RLHF dialogues, UltraFeedback-binarized, and rows through Hugging Face ``datasets``.

Every shape is written by the test as a tiny file and must give, for SFT, DPO and RAM, the tokens and loss masks
computed by hand here: the response tokens (and EOS), and only those, are in the loss mask.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from test_data import CharTok, ids, write_jsonl

from ramjax import data as D
from ramjax import generate
from ramjax.config import TrainConfig, load_config
from ramjax.data import DataError


def U(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def A(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


# The same content, "hi" -> good (chosen) / bad (rejected), in every preference shape.
PREFERENCE_SHAPES = {
    "trl_strings": {"prompt": "hi", "chosen": "good", "rejected": "bad"},
    "trl_conversational": {"prompt": [U("hi")], "chosen": [A("good")], "rejected": [A("bad")]},
    "trl_implicit_prompt": {"chosen": [U("hi"), A("good")], "rejected": [U("hi"), A("bad")]},
    "ultrafeedback": {"prompt": "hi", "prompt_id": "0f3a", "chosen": [U("hi"), A("good")],
                      "rejected": [U("hi"), A("bad")], "messages": [U("hi"), A("good")], "score_chosen": 8.5,
                      "score_rejected": 3.0},
    "hh_rlhf": {"chosen": "\n\nHuman: hi\n\nAssistant: good", "rejected": "\n\nHuman: hi\n\nAssistant: bad"},
}
# "hi" -> good as a single response.
SFT_SHAPES = {
    "sft": {"prompt": "hi", "response": "good"},
    "trl_completion": {"prompt": "hi", "completion": "good"},
    "trl_completion_conversational": {"prompt": [U("hi")], "completion": [A("good")]},
    "messages": {"messages": [U("hi"), A("good")]},
    "alpaca": {"instruction": "hi", "input": "", "output": "good"},
}

PROMPT = [1] + ids("Q:hiA:")  # BOS + the plain template (CharTok renders "Q:{prompt}A:")
GOOD, BAD, MEH = ids("good") + [2], ids("bad") + [2], ids("meh") + [2]


def expected(resp, T):
    """(tokens, loss_mask) of one padded row: the prompt, then the response whose tokens (EOS included) and only
    they are targets in the loss."""
    seq = PROMPT + resp
    tokens = seq + [0] * (T - len(seq))
    mask = [0.0] * (len(PROMPT) - 1) + [1.0] * len(resp) + [0.0] * (T - len(seq) + 1)
    return tokens, mask


def first_batch(tmp_path, rows, stage, *extra, n=2, name="d.jsonl"):
    path = write_jsonl(tmp_path / name, rows * n)
    cfg = load_config(TrainConfig, None, ["tokenizer=t", "data.max_len=24", "data.max_prompt_len=12",
                                          f"data.batch_size={n}", "data.shuffle=false", f"stage={stage}",
                                          f"data.train_files=[{path}]", *extra])
    return next(D.train_iterator(cfg, CharTok(), process_index=0, process_count=1))


def assert_row(batch, prefix, resp):
    tokens, mask = expected(resp, 24)
    for r in range(batch[prefix + "tokens"].shape[0]):
        assert batch[prefix + "tokens"][r].tolist() == tokens
        assert batch[prefix + "loss_mask"][r].tolist() == mask


@pytest.mark.parametrize("shape", sorted(PREFERENCE_SHAPES))
def test_preference_shapes_give_the_hand_computed_masks_for_dpo_sft_and_ram(tmp_path, shape):
    row = PREFERENCE_SHAPES[shape]
    assert D.read_jsonl(write_jsonl(tmp_path / "p.jsonl", [row]))[0].format == "preference"
    b = first_batch(tmp_path, [row], "dpo")  # DPO: (chosen, rejected) on a shared prompt
    assert_row(b, "chosen_", GOOD)
    assert_row(b, "rejected_", BAD)
    assert_row(first_batch(tmp_path, [row], "sft"), "", GOOD)  # SFT on a preference file: the chosen response
    b = first_batch(tmp_path, [row], "ram", "ram.negatives=rejected")  # RAM against the rejected responses
    assert_row(b, "chosen_", GOOD)
    assert_row(b, "rejected_", BAD)
    # RAM against P_M's one-time samples: sample.py writes the row back with `proposal`; y_data is `chosen`
    b = first_batch(tmp_path, [dict(row, proposal="meh")], "ram")
    assert_row(b, "chosen_", GOOD)
    assert_row(b, "rejected_", MEH)


@pytest.mark.parametrize("shape", sorted(SFT_SHAPES))
def test_single_response_shapes_give_the_hand_computed_masks_for_sft_and_ram(tmp_path, shape):
    row = SFT_SHAPES[shape]
    assert_row(first_batch(tmp_path, [row], "sft"), "", GOOD)
    b = first_batch(tmp_path, [dict(row, proposal="meh")], "ram")
    assert_row(b, "chosen_", GOOD)
    assert_row(b, "rejected_", MEH)


def test_shapes_under_the_chat_template(tmp_path):
    # CharTok's chat template: <s>[u]hi</s>[a] then the assistant turn "good</s>"
    prompt = [1] + ids("[u]hi") + [2] + ids("[a]")
    for row in list(PREFERENCE_SHAPES.values()):
        (c, r), = D.tokenize_records(D.read_jsonl(write_jsonl(tmp_path / "p.jsonl", [row])), CharTok(), kind="pair",
                                     template="chat", max_len=32, max_prompt_len=16).examples
        assert c.tokens.tolist() == prompt + GOOD and r.tokens.tolist() == prompt + BAD
        assert c.target.tolist() == [False] * len(prompt) + [True] * len(GOOD)
    for row in SFT_SHAPES.values():
        s, = D.tokenize_records(D.read_jsonl(write_jsonl(tmp_path / "s.jsonl", [row])), CharTok(), template="chat",
                                max_len=32, max_prompt_len=16).examples
        assert s.tokens.tolist() == prompt + GOOD
        assert s.target.tolist() == [False] * len(prompt) + [True] * len(GOOD)


def test_hh_rlhf_multi_turn_split_at_the_shared_prefix(tmp_path):
    chosen = "\n\nHuman: 2+2?\n\nAssistant: 4 I think\n\nHuman: sure?\n\nAssistant: Yes, 4."
    rejected = "\n\nHuman: 2+2?\n\nAssistant: 4 I think\n\nHuman: sure?\n\nAssistant: No"
    msgs, c, r = D.split_hh_dialogue(chosen, rejected)
    assert msgs == [U("2+2?"), A("4 I think"), U("sure?")] and (c, r) == ("Yes, 4.", "No")
    # the shared prefix "...Assistant: " plus a common first letter never cuts inside the response
    assert D.split_hh_dialogue("\n\nHuman: q\n\nAssistant: Sure", "\n\nHuman: q\n\nAssistant: Sorry")[1:] == \
        ("Sure", "Sorry")
    (a, b), = D.tokenize_records(D.read_jsonl(write_jsonl(tmp_path / "hh.jsonl", [{"chosen": chosen,
                                                                                   "rejected": rejected}])),
                                 CharTok(), kind="pair", max_len=64, max_prompt_len=40).examples
    prompt = [1] + ids("Q:2+2?A:") + ids("4 I think") + ids("Q:sure?A:")
    assert a.tokens.tolist() == prompt + ids("Yes, 4.") + [2] and b.tokens.tolist() == prompt + ids("No") + [2]
    assert a.target.tolist() == [False] * len(prompt) + [True] * 8 and b.target.sum() == 3
    with pytest.raises(DataError, match=r"hh.jsonl:1: field 'prompt' is missing, and 'chosen' and 'rejected' do "
                                        r"not share a dialogue ending with"):
        D.read_jsonl(write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "good", "rejected": "bad"}]))


def test_sample_py_draws_for_the_prompt_that_is_trained_on(tmp_path):
    """generate.prompt_of (what sample.py samples for) renders to the prompt tokens training uses."""
    tok = CharTok()
    rows = list(PREFERENCE_SHAPES.values()) + list(SFT_SHAPES.values()) + [
        {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d", "rejected":
         "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: e"},
        {"prompt": "hi", "chosen": [U("hi"), A("x"), U("again"), A("good")],  # implicit multi-turn
         "rejected": [U("hi"), A("x"), U("again"), A("bad")]},
    ]
    for i, row in enumerate(rows):
        (c, _), = D.tokenize_records(D.read_jsonl(write_jsonl(tmp_path / f"{i}.jsonl", [dict(row, proposal="z")])),
                                     tok, kind="pair", negatives="proposal", max_len=64, max_prompt_len=40).examples
        n_prompt = int(np.argmax(c.target))
        assert D.encode_prompt(tok, generate.prompt_of(row), "plain") == c.tokens[:n_prompt].tolist(), row


@pytest.mark.parametrize("row, match", [
    ({"prompt": "p", "response": "r", "completion": "c"}, r"both 'response' and 'completion'"),
    ({"messages": [U("u"), A("a")], "prompt": "p", "completion": "c"}, r"both 'messages' and a prompt/response"),
    ({"prompt": "p", "chosen": "c"}, r"'chosen' is present but 'rejected' is missing"),
    ({"prompt": "p", "chosen": [A("c")], "rejected": "r"}, r"both be strings or both message lists"),
    ({"prompt": "p", "completion": [A("c"), U("u"), A("d")]},
     r"'completion' must be one assistant message, got the roles \['assistant', 'user', 'assistant'\]"),
    ({"chosen": [A("c")], "rejected": [A("r")]}, r"share no messages, so there is no prompt"),
    ({"prompt": [U("u"), A("a")], "completion": "c"}, r"prompt must end with a user \(or system\) turn"),
    ({"prompt": "p", "completion": 3}, r"field 'completion' must be a str, got int \(or a list"),
])
def test_ambiguous_or_malformed_shapes_are_named_errors(tmp_path, row, match):
    with pytest.raises(DataError, match=r"d.jsonl:1: .*" + match):
        D.read_jsonl(write_jsonl(tmp_path / "d.jsonl", [row]))


# ------------------------------------------------------------------------------------------------------------
# data.source=hf (Hugging Face datasets, optional)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return datasets


def test_hf_source_reads_parquet_and_json_like_jsonl(tmp_path, hf_cache):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    uf = [dict(PREFERENCE_SHAPES["ultrafeedback"], prompt=f"q{i}",
               chosen=[U(f"q{i}"), A("good")], rejected=[U(f"q{i}"), A("bad")], messages=[U(f"q{i}"), A("good")])
          for i in range(4)]
    pq.write_table(pa.Table.from_pylist(uf), tmp_path / "uf.parquet")
    jsonl = write_jsonl(tmp_path / "uf.jsonl", uf)
    want = [r.data for r in D.read_jsonl(jsonl)]
    got = D.read_hf([str(tmp_path / "uf.parquet")])
    assert [r.format for r in got] == ["preference"] * 4
    assert [{k: r.data[k] for k in ("prompt", "chosen", "rejected")} for r in got] == \
        [{k: w[k] for k in ("prompt", "chosen", "rejected")} for w in want]
    assert got[0].data["prompt"] == [U("q0")] and got[0].where.endswith("uf.parquet/train:0")
    # a JSON array file and a JSONL file read through datasets; missing fields (None) are dropped
    (tmp_path / "trl.json").write_text(json.dumps([{"prompt": "hi", "completion": "good"},
                                                   {"prompt": "hi", "completion": "good", "extra": 1}]))
    assert [r.data["response"] for r in D.read_hf([str(tmp_path / "trl.json")])] == ["good", "good"]
    # through the config: the same batch as the JSONL file gives
    common = ["tokenizer=t", "data.max_len=24", "data.max_prompt_len=12", "data.batch_size=4", "data.shuffle=false",
              "stage=dpo"]
    bj = next(D.train_iterator(load_config(TrainConfig, None, common + [f"data.train_files=[{jsonl}]"]), CharTok(),
                               process_index=0, process_count=1))
    cfg = load_config(TrainConfig, None, common + ["data.source=hf", f"data.train_files=[{tmp_path / 'uf.parquet'}]",
                                                   f"data.eval_files=[{tmp_path / 'uf.parquet'}]"])
    bh = next(D.train_iterator(cfg, CharTok(), process_index=0, process_count=1))
    assert set(bh) == set(bj) and all(np.array_equal(bh[k], bj[k]) for k in bj)
    assert sum(1 for _ in D.eval_iterator(cfg, CharTok(), process_index=0, process_count=1)) == 1
    # a dataset directory through data.hf_path (with the split)
    (tmp_path / "ds").mkdir()
    pq.write_table(pa.Table.from_pylist(uf[:2]), tmp_path / "ds" / "train.parquet")
    cfg = load_config(TrainConfig, None, common + ["data.source=hf", f"data.hf_path={tmp_path / 'ds'}",
                                                   "data.batch_size=2"])
    b = next(D.train_iterator(cfg, CharTok(), process_index=0, process_count=1))
    assert np.array_equal(b["chosen_loss_mask"], bj["chosen_loss_mask"][:2])
    with pytest.raises(DataError, match=r"all of one kind"):
        D.read_hf([str(tmp_path / "uf.parquet"), jsonl])
    with pytest.raises(DataError, match=r"not found"):
        D.read_hf([str(tmp_path / "nope.parquet")])
    with pytest.raises(ValueError, match=r"data.source=hf needs data.train_files"):
        load_config(TrainConfig, None, ["tokenizer=t", "data.source=hf"])


def test_hf_source_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match=r"pip install datasets"):
        D.read_hf(["x.parquet"])
