"""SamplingParams: one home for every sampling default, the presets, validation and the config section."""
import dataclasses
import inspect

import pytest

from ramjax import sampling_params as SP
from ramjax.sampling_params import PRESETS, SamplingParams


def test_release_preset_is_the_authors_one_time_sample_settings():
    # MISSION / arXiv 2505.19700: one-time P_M samples at T 0.5, top-p 0.95, top-k 10, repetition penalty 1.05.
    r = PRESETS["release"]
    assert (r.mode, r.proposal_temperature, r.proposal_top_p, r.top_k, r.repetition_penalty) == (
        "proposal", 0.5, 0.95, 10, 1.05)
    s, g = PRESETS["sampled"], PRESETS["greedy"]
    plain = dict(proposal_temperature=1.0, aligner_temperature=1.0, proposal_top_p=1.0, aligner_top_p=1.0, top_k=0,
                 repetition_penalty=1.0, kl_threshold=None)
    assert all(getattr(s, k) == v for k, v in plain.items())
    assert all(getattr(g, k) == v for k, v in plain.items() if "temperature" not in k)
    assert g.proposal_temperature == g.aligner_temperature == 0.0
    assert (s.greedy, g.greedy) == (False, True)
    assert SP.preset("release", max_new_tokens=9) == dataclasses.replace(r, max_new_tokens=9)
    with pytest.raises(SP.SamplingParameterError, match="did you mean 'greedy'"):
        SP.preset("gredy")


def test_no_sampling_default_is_written_twice():
    # sample/stream/generate_jsonl take a SamplingParams plus overrides: no keyword of theirs repeats a field.
    from ramjax import generate, sampler

    for fn in (sampler.sample, sampler.stream, generate.generate_jsonl):
        names = set(inspect.signature(fn).parameters)
        assert not names & set(SP.FIELDS), (fn.__name__, names & set(SP.FIELDS))
    # the evaluation defaults and decodings are the presets' values
    from ramjax import evaluate

    assert evaluate.SAMPLING_DEFAULTS["kl_threshold"] is PRESETS["sampled"].kl_threshold
    assert evaluate.DECODINGS["greedy"]["greedy"] is True


def test_validation_names_the_setting():
    SamplingParams().validate()
    SamplingParams(proposal_temperature=[0.0, 1.0], greedy=[True, False]).validate()  # per prompt
    assert SamplingParams(top_k=[1, 2]).top_k == (1, 2)  # lists become tuples: the record stays hashable
    hash(SamplingParams(top_k=[1, 2], stop="x"))
    assert SamplingParams(stop="###").stop == ("###",)
    for bad, match in [(dict(n=0), "n=0"), (dict(max_new_tokens=0), "max_new_tokens"),
                       (dict(proposal_top_p=0.0), "proposal_top_p"), (dict(aligner_top_p=(0.5, 2.0)), "aligner_top_p"),
                       (dict(aligner_temperature=-1.0), "aligner_temperature"), (dict(top_k=1.5), "top_k"),
                       (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(kl_threshold=-1.0), "kl_threshold"),
                       (dict(inra_lambda=float("nan")), "inra_lambda"), (dict(kl_fallback="papr"), "did you mean"),
                       (dict(stop=("",)), "stop"), (dict(greedy=1), "greedy"),
                       (dict(decode_dtype="float16"), "decode_dtype")]:
        with pytest.raises(SP.SamplingParameterError, match=match):
            SamplingParams(**bad).validate()
    with pytest.raises(SP.ModeError, match="unknown mode"):
        SamplingParams(mode="beam").validate()
    with pytest.raises(SP.SamplingParameterError, match="did you mean 'top_k'"):
        SamplingParams().replace(topk=3)
    with pytest.raises(SP.SamplingParameterError, match="SamplingParams or a preset"):
        SP.resolve({"mode": "par"})
