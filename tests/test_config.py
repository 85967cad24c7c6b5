"""Typed configs: YAML + dotted overrides, strict keys and types, validation hooks, save/load round trip."""
from __future__ import annotations

import dataclasses
import glob
import os
from typing import Literal

import pytest
import yaml

from ramjax import config as C
from ramjax.config import ConfigError, SampleConfig, TrainConfig, load_config
from ramjax.sampling_params import SamplingParams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRATCH = ["tokenizer=tok"]  # model.init=scratch needs a tokenizer path to validate


# A small schema exercising every supported annotation, with plain (non-frozen) and frozen dataclasses.
@dataclasses.dataclass
class Inner:
    x: int = 1
    ratio: float = 0.5
    name: str | None = None

    def validate(self):
        if self.x > 100:
            raise ConfigError(f"inner.x={self.x} must be <= 100")


@dataclasses.dataclass(frozen=True)
class Outer:
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    files: tuple[str, ...] = ()
    sizes: list[int] = dataclasses.field(default_factory=list)
    pair: tuple[int, float] = (1, 2.0)
    table: dict[str, int] = dataclasses.field(default_factory=dict)
    inner: Inner = dataclasses.field(default_factory=Inner)
    maybe: Inner | None = None
    validated: list[str] = dataclasses.field(default_factory=list, compare=False)

    def validate(self):
        # children are validated before their parent
        self.validated.append("outer")


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def test_defaults_and_every_shipped_config_load():
    assert load_config(TrainConfig, None, SCRATCH).ram.alpha == 1e-4
    files = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
    names = {os.path.basename(f) for f in files}
    assert {"pretrain.yaml", "sft.yaml", "dpo.yaml", "ram.yaml", "sample.yaml"} <= names
    from ramjax.config import TokenizerConfig
    from ramjax.evaluate import EvalConfig
    from ramjax.experiments.ablate import AblateConfig
    from ramjax.experiments.pipeline import DefaultRunConfig
    from ramjax.experiments.realign_sweep import RealignSweepConfig

    other = {"default.yaml": DefaultRunConfig, "ablate.yaml": AblateConfig, "eval.yaml": EvalConfig,
             "realign_sweep.yaml": RealignSweepConfig, "tokenizer.yaml": TokenizerConfig}
    for f in files:
        name = os.path.basename(f)
        cls = other.get(name) or (SampleConfig if name.startswith("sample") else TrainConfig)
        cfg = load_config(cls, f)
        if cls is TrainConfig and name == "inra.yaml":  # an adapter trained with the SFT objective
            assert cfg.stage == "sft" and cfg.inra.enabled
        elif cls is TrainConfig:  # ram.yaml, or a worked example such as pod_qwen7b_ram.yaml
            assert cfg.stage == name[:-5] or name[:-5].endswith("_" + cfg.stage), name


def test_stage_configs_train_with_the_pipelines_recipe():
    """One source of truth: configs/<stage>.yaml and the pipeline's stages come from the same configs/recipe files,
    so a stage run by hand trains as the pipeline does (only paths, checkpoints and progress bars differ)."""
    from ramjax.experiments.pipeline import DefaultRunConfig

    run = load_config(DefaultRunConfig, os.path.join(REPO, "configs", "default.yaml"))
    for name, stage in (("pretrain", "proposal"), ("sft", "sft"), ("dpo", "dpo"), ("ram", "ram")):
        by_hand = load_config(TrainConfig, os.path.join(REPO, "configs", f"{name}.yaml"))
        recipe = getattr(run.stages, stage)
        for key in ("stage", "steps", "epochs", "tokens", "optimizer", "schedule", "ram", "dpo"):
            assert getattr(by_hand, key) == getattr(recipe, key), (name, key)
        for key in ("max_len", "max_prompt_len", "batch_size", "packing", "template"):
            assert getattr(by_hand.data, key) == getattr(recipe.data, key), (name, key)
    pre = load_config(TrainConfig, os.path.join(REPO, "configs", "pretrain.yaml"))
    assert C.config_to_dict(pre.model.arch) == C.config_to_dict(run.pipeline.proposal_arch)
    # and the recipe is the one the README reports: RAM at lr 3e-3 on packed rows of 16, alpha 1e-4
    assert (run.stages.ram.optimizer.lr, run.stages.ram.data.batch_size, run.stages.ram.ram.alpha) == (3e-3, 16, 1e-4)


def test_nested_include_of_a_section_and_of_a_mapping_of_sections(tmp_path):
    from ramjax.experiments.pipeline import DefaultRunConfig

    (tmp_path / "sub").mkdir()
    write(tmp_path, "sub/opt.yaml", {"lr": 0.5, "clip_norm": 2.0})
    write(tmp_path, "sub/stage.yaml", {"include": "common.yaml", "stage": "ram", "steps": 7,
                                             "optimizer": {"include": "opt.yaml", "lr": 0.25}})
    write(tmp_path, "sub/common.yaml", {"data": {"max_len": 33, "max_prompt_len": 11}})
    write(tmp_path, "presets.yaml", {"fast": {"temperature": 0.0}})
    top = write(tmp_path, "top.yaml", {"stages": {"ram": {"include": "sub/stage.yaml", "steps": 9}},
                                          "pipeline": {"sampling": {"include": "presets.yaml"},
                                                       "samples_preset": "fast"}})
    run = load_config(DefaultRunConfig, top)
    ram = run.stages.ram
    # the including mapping wins over its file, nested files resolve relative to the file that names them
    assert (ram.steps, ram.optimizer.lr, ram.optimizer.clip_norm, ram.data.max_len) == (9, 0.25, 2.0, 33)
    assert run.pipeline.sampling["fast"].temperature == 0.0
    # a free-form mapping keeps an "include" key as data
    cfg = load_config(TrainConfig, write(tmp_path, "fm.yaml", {**{"data": {"field_map": {"include": "x"}}},
                                                                  "model": {"init": "m"}}))
    assert cfg.data.field_map == {"include": "x"}
    write(tmp_path, "sub/loop.yaml", {"include": "loop.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(DefaultRunConfig, write(tmp_path, "l.yaml", {"stages": {"ram": {"include": "sub/loop.yaml"}}}))


def test_overrides_of_nested_and_list_fields(tmp_path):
    cfg = load_config(TrainConfig, None, SCRATCH + [
        "optimizer.lr=1e-6", "ram.alpha=1e-3", "mesh.fsdp=8", "data.train_files=[a.jsonl,b.jsonl]",
        "model.arch.num_layers=6", "mesh.rules.vocab=null", "run_dir=2024", "steps=1e3", "epochs=2",
        "data.eval_files=only.jsonl", "model.arch.rope_scaling={factor: 4.0}"])
    assert cfg.optimizer.lr == 1e-6 and isinstance(cfg.optimizer.lr, float)  # YAML reads '1e-6' as a string
    assert cfg.ram.alpha == 1e-3
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, 8, 1)
    assert cfg.data.train_files == ("a.jsonl", "b.jsonl")
    assert cfg.data.eval_files == ("only.jsonl",)  # a bare scalar for a list field
    assert cfg.model.arch.num_layers == 6
    assert cfg.mesh.rules == {"vocab": None} and dict(cfg.mesh.sharding_rules())["vocab"] is None
    assert cfg.run_dir == "2024"  # the text, not the int YAML would make of it
    assert cfg.steps == 1000 and cfg.epochs == 2.0 and isinstance(cfg.epochs, float)
    assert cfg.model.arch.rope_scaling.factor == 4.0 and cfg.model.arch.rope_scaling.rope_type == "llama3"
    # later overrides win; a mapping for a section merges into it
    cfg2 = load_config(TrainConfig, None, SCRATCH + ["mesh.fsdp=8", "mesh={tensor: 2}", "seed=1", "seed=7"])
    assert (cfg2.mesh.fsdp, cfg2.mesh.tensor, cfg2.seed) == (8, 2, 7)
    # overrides apply on top of the file
    path = write(tmp_path, "x.yaml", {"stage": "ram", "tokenizer": "t", "optimizer": {"lr": 1e-3, "name": "rmsprop"}})
    cfg3 = load_config(TrainConfig, path, ["optimizer.lr=5e-7"])
    assert (cfg3.stage, cfg3.optimizer.name, cfg3.optimizer.lr) == ("ram", "rmsprop", 5e-7)


def test_unknown_key_did_you_mean(tmp_path):
    with pytest.raises(ConfigError, match=r"'optimzer'.*did you mean 'optimizer'\?.*Valid keys of TrainConfig:.*stage"):
        load_config(TrainConfig, None, ["optimzer.lr=1"])
    with pytest.raises(ConfigError, match=r"'model.arch.hidden_sise'.*did you mean 'model.arch.hidden_size'\?"
                                          r".*Valid keys of section 'model.arch':.*num_layers"):
        load_config(TrainConfig, None, ["model.arch.hidden_sise=32"])
    # a key of another section is suggested with its full path
    with pytest.raises(ConfigError, match=r"'lr'.*did you mean 'optimizer.lr'\?"):
        load_config(TrainConfig, None, ["lr=1e-6"])
    # unknown keys in a YAML file, nested
    path = write(tmp_path, "bad.yaml", {"tokenizer": "t", "ram": {"alhpa": 0.1}})
    with pytest.raises(ConfigError, match=r"'ram.alhpa'.*did you mean 'ram.alpha'\?.*Valid keys of section 'ram': "
                                          r"alpha, negatives"):
        load_config(TrainConfig, path)
    with pytest.raises(ConfigError, match=r"'mesh.rules.vocb'|unknown logical axis 'vocb'; did you mean 'vocab'"):
        load_config(TrainConfig, None, SCRATCH + ["mesh.rules.vocb=tensor"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(TrainConfig, None, ["seed.x=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TrainConfig, None, ["seed"])


@pytest.mark.parametrize("override, expected, given", [
    ("data.max_len=abc", "int", "str 'abc'"),
    ("data.batch_size=2.5", "int", "float 2.5"),
    ("data.packing=1", "bool", "int 1"),
    ("optimizer.lr=fast", "float", "str 'fast'"),
    ("optimizer.lr=true", "float", "bool True"),
    ("data.train_files={a: 1}", "list of str", "dict"),
    ("data.train_files=[1, 2]", "str", "int 1"),
    ("proposal=[a]", "str | null", "list"),
    ("checkpoint.keep=null", "int", "NoneType None"),
])
def test_wrong_type_names_key_expected_and_given(override, expected, given):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, None, SCRATCH + [override])
    msg = str(e.value)
    assert repr(key) in msg or repr(key + "[0]") in msg, msg
    assert f"expected {expected}" in msg and f"got {given}" in msg, msg


def test_literal_choice_error():
    with pytest.raises(ConfigError, match=r"'stage': expected one of 'pretrain', 'sft', 'dpo', 'ram', 'trra', got "
                                          r"str 'rma'; did you mean 'ram'\?"):
        load_config(TrainConfig, None, SCRATCH + ["stage=rma"])


@pytest.mark.parametrize("override, match", [
    ("ram.alpha=-1e-4", r"ram.alpha=-0.0001 must be >= 0"),
    ("ram.alpha=.nan", r"ram.alpha=nan must be >= 0"),
    ("data.max_prompt_len=513", r"max_prompt_len=513 must be in \[1, data.max_len=512\]"),
    ("optimizer.grad_accum=3", r"batch_size=64 must be divisible by optimizer.grad_accum=3"),
    ("mesh.fsdp=-1 mesh.data=-1", r"at most one axis may be -1"),
    ("model.arch.num_kv_heads=3", r"'model.arch': num_heads=4 must be a multiple of num_kv_heads=3"),
    ("stage=dpo data.format=sft", r"stage=dpo cannot train on data.format='sft'"),
    ("stage=ram data.format=preference", r"set ram.negatives=rejected"),
    ("stage=trra", r"trra.reference and trra.aligned"),
    ("tokenizer=null", r"set tokenizer=PATH"),
])
def test_validation_hooks(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, None, SCRATCH + override.split())


def test_valid_cross_field_combinations():
    load_config(TrainConfig, None, SCRATCH + ["stage=ram", "ram.negatives=rejected", "data.format=preference"])
    load_config(TrainConfig, None, SCRATCH + ["stage=ram", "data.format=proposal_samples", "ram.alpha=0"])
    load_config(TrainConfig, None, ["model.init=some/hf/dir"])  # a checkpoint brings its own tokenizer


def test_save_load_round_trip(tmp_path):
    cfg = load_config(TrainConfig, None, SCRATCH + [
        "stage=ram", "optimizer.lr=3e-7", "data.train_files=[a.jsonl, b c.jsonl]", "mesh.rules={act_batch: [data, "
        "fsdp], vocab: null}", "model.arch.rope_scaling={factor: 2.0}", "data.field_map={instruction: prompt}",
        "distributed.num_processes=2", "epochs=0.5", "run_dir=007"])
    path = tmp_path / "run" / "config.yaml"
    C.save_config(cfg, path)
    assert load_config(TrainConfig, str(path)) == cfg
    assert os.listdir(tmp_path / "run") == ["config.yaml"]  # no temp file left behind
    text = C.format_config(cfg)
    assert text.startswith("# TrainConfig\n") and "alpha: 0.0001" in text
    assert C.config_to_dict(cfg)["data"]["train_files"] == ["a.jsonl", "b c.jsonl"]
    s = load_config(SampleConfig, os.path.join(REPO, "configs", "sample.yaml"),
                    ['sampling.stop=["\\n\\nHuman:", "###"]', "sampling.kl_threshold=null",
                     "sampling.proposal_temperature=[0.5, 1.0]"])
    C.save_config(s, tmp_path / "s.yaml")
    assert load_config(SampleConfig, str(tmp_path / "s.yaml")) == s
    assert s.sampling.stop == ("\n\nHuman:", "###") and s.sampling.kl_threshold is None
    assert s.sampling.proposal_temperature == (0.5, 1.0)  # a per-prompt setting survives the round trip


def test_include_files_merge(tmp_path):
    write(tmp_path, "base.yaml", {"tokenizer": "t", "seed": 3, "optimizer": {"name": "rmsprop", "lr": 1e-3}})
    write(tmp_path, "mid.yaml", {"include": "base.yaml", "optimizer": {"lr": 1e-4}, "ram": {"alpha": 0.01}})
    path = write(tmp_path, "top.yaml", {"include": ["mid.yaml"], "stage": "ram", "ram": {"negatives": "rejected"}})
    cfg = load_config(TrainConfig, path)
    assert (cfg.seed, cfg.optimizer.name, cfg.optimizer.lr) == (3, "rmsprop", 1e-4)
    assert (cfg.ram.alpha, cfg.ram.negatives, cfg.stage) == (0.01, "rejected", "ram")
    write(tmp_path, "loop.yaml", {"include": "loop.yaml"})
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(TrainConfig, str(tmp_path / "loop.yaml"))


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainConfig, str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainConfig, write(tmp_path, "bad.yaml", "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(TrainConfig, write(tmp_path, "list.yaml", "- 1\n- 2\n"))


def test_generic_machinery_on_a_custom_schema():
    cfg = C.config_from_dict(Outer, {"mode": "b", "files": ["x"], "sizes": [1, 2.0], "pair": [3, 4],
                                     "table": {"k": 5}, "inner": {"x": 7, "ratio": 1}, "maybe": {"name": "m"}})
    assert cfg.mode == "b" and cfg.files == ("x",) and cfg.sizes == [1, 2] and cfg.pair == (3, 4.0)
    assert isinstance(cfg.pair[1], float) and isinstance(cfg.inner.ratio, float) and cfg.inner.ratio == 1.0
    assert cfg.table == {"k": 5} and cfg.maybe == Inner(name="m") and cfg.validated == ["outer"]
    assert C.override_config(cfg, ["inner.x=9", "maybe=null"]).inner.x == 9
    with pytest.raises(ConfigError, match=r"'pair': expected list of 2 \(int, float\), got list \[1\] \(length 1\)"):
        C.config_from_dict(Outer, {"pair": [1]})
    with pytest.raises(ConfigError, match=r"inner.x=101 must be <= 100"):  # hook of a plain dataclass
        C.config_from_dict(Outer, {"inner": {"x": 101}})
    with pytest.raises(ConfigError, match=r"'maybe.nme'.*did you mean 'maybe.name'"):
        C.config_from_dict(Outer, {"maybe": {"nme": "m"}})
    with pytest.raises(ConfigError, match=r"'table.k': expected int, got str 'v'"):
        C.config_from_dict(Outer, {"table": {"k": "v"}})
    with pytest.raises(ConfigError, match=r"'mode': expected one of 'a', 'b', got bool True"):
        C.config_from_dict(Outer, {"mode": True})


def test_model_and_mesh_conversions():
    from ramjax.model import ModelConfig
    from ramjax.sharding import DEFAULT_RULES, MeshConfig

    cfg = load_config(TrainConfig, None, SCRATCH + ["model.arch.num_layers=3", "model.dtype=bfloat16",
                                                    "mesh.fsdp=4", "mesh.data=2", "mesh.rules.mlp=null"])
    mc = cfg.model.model_config(vocab_size=300, eos_token_id=2)
    assert mc == ModelConfig(vocab_size=300, num_layers=3, dtype="bfloat16", eos_token_id=2)
    assert cfg.mesh.mesh_config() == MeshConfig(data=2, fsdp=4, tensor=1)
    rules = cfg.mesh.sharding_rules()
    assert [n for n, _ in rules] == [n for n, _ in DEFAULT_RULES] and dict(rules)["mlp"] is None
    with pytest.raises(ConfigError, match="vocab_size is 0"):
        cfg.model.model_config()
    # the arch section is the model's own ModelConfig (one definition); the keys set elsewhere are refused there
    assert isinstance(cfg.model.arch, ModelConfig) and cfg.model.arch.vocab_size == 0
    assert cfg.model.arch.num_layers == 3
    for key, where in (("dtype=bfloat16", "model.dtype"), ("remat=true", "model.remat"),
                       ("attention_impl=chunked", "model.attention_impl"), ("eos_token_id=3", "the tokenizer")):
        with pytest.raises(ConfigError, match=f"model.arch.{key.split('=')[0]} is not an architecture key: "
                                              f"set {where}"):
            load_config(TrainConfig, None, SCRATCH + [f"model.arch.{key}"])
    with pytest.raises(ConfigError, match="did you mean 'llama'"):
        load_config(TrainConfig, None, SCRATCH + ["model.arch.architecture=llam"])
    with pytest.raises(ConfigError, match="hidden_size=0 must be positive"):
        load_config(TrainConfig, None, SCRATCH + ["model.arch.hidden_size=0"])


def test_sample_config_validation():
    base = ["proposal=p", "prompts_file=x.jsonl", "aligner=q"]
    # the sampling section is a SamplingParams: its defaults are SamplingParams' own (defined once), but for the
    # released 1024 new tokens, kept also when the section is given in part
    assert load_config(SampleConfig, None, base).sampling == SamplingParams(max_new_tokens=1024)
    assert SampleConfig().sampling == SamplingParams(max_new_tokens=1024)
    assert load_config(SampleConfig, None, base + ["sampling={mode: sparse}"]).sampling == SamplingParams(
        mode="sparse", max_new_tokens=1024)
    load_config(SampleConfig, None, ["proposal=p", "prompts_file=x.jsonl", "sampling.mode=proposal"])
    for bad, match in [("aligner=null", "mode=par needs aligner"), ("sampling.n=0", "n=0 must be an integer >= 1"),
                       ("sampling.proposal_top_p=1.5", r"proposal_top_p=1.5 is invalid: expected top-p in \(0, 1\]"),
                       ("sampling.kl_threshold=-1", "kl_threshold"),
                       ("sampling.kl_fallback=papr", "did you mean 'paper'"),
                       ("sampling.inra_lambda=.inf", "inra_lambda"),
                       ("sampling.num_speculative_tokens=-1", "num_speculative_tokens=-1 must be an integer >= 0"),
                       ("sampling.num_speculative_tokens=2", "mode='par'.*no closed-form"),
                       ("mode=par", "did you mean 'sampling.mode'")]:  # bare keys are sample.py's convenience only
        with pytest.raises(ConfigError, match=match):
            load_config(SampleConfig, None, base + [bad])
    spec = load_config(SampleConfig, None, base + ["sampling.mode=product", "sampling.num_speculative_tokens=4"])
    assert spec.sampling.num_speculative_tokens == 4


def test_split_cli_args():
    assert C.split_cli_args(["configs/x.yaml", "a.b=1", "c=[1,2]"]) == ("configs/x.yaml", ["a.b=1", "c=[1,2]"])
    assert C.split_cli_args(["a=1"]) == (None, ["a=1"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        C.split_cli_args(["x.yaml", "y.yaml"])


def test_train_py_picks_the_program_a_config_declares(tmp_path):
    """train.py dispatches on the file's declared ``program:`` (default ``train``), never on which keys it holds."""
    from ramjax import cli

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert cli._program(os.path.join(repo, "configs", "default.yaml"), []) == "pipeline"
    assert cli._program(os.path.join(repo, "configs", "ablate.yaml"), []) == "ablate"
    assert cli._program(os.path.join(repo, "configs", "sft.yaml"), []) == "train"
    # a pipeline-looking file that does not declare its program is a training config (and fails as one)
    f = tmp_path / "p.yaml"
    f.write_text("pipeline: {alpha: 0.1}\n")
    assert cli._program(str(f), []) == "train"
    with pytest.raises(ConfigError, match="unknown config key 'pipeline'"):
        load_config(TrainConfig, str(f))
    inc = tmp_path / "inc.yaml"
    inc.write_text(f"include: {os.path.join(repo, 'configs', 'default.yaml')}\nrun_dir: x\n")
    assert cli._program(str(inc), []) == "pipeline"  # declared in an included file
    with pytest.raises(ConfigError, match="'foo'.*not one of train, pipeline, ablate"):
        cli._program(str(f), ["program=foo"])


def test_sample_cli_maps_bare_sampling_keys():
    """sample.py's convenience: a bare SamplingParams field goes to the sampling section, ``lambda=`` to
    ``sampling.inra_lambda``; every other argument is passed on unchanged (and stays strict)."""
    from ramjax.cli import _sampling_key

    assert _sampling_key("mode=sparse") == "sampling.mode=sparse"
    assert _sampling_key("aligner_temperature=0.3") == "sampling.aligner_temperature=0.3"
    assert _sampling_key("lambda=0.5") == "sampling.inra_lambda=0.5"
    assert _sampling_key("stop=[a, b=c]") == "sampling.stop=[a, b=c]"
    for same in ("sampling.mode=par", "seed=3", "configs/sample.yaml", "--training-data", "modee=par"):
        assert _sampling_key(same) == same
    args = ["proposal=p", "prompts_file=x", "mode=proposal", "lambda=0.25", "top_k=10"]
    cfg = load_config(SampleConfig, None, [_sampling_key(a) for a in args])
    assert cfg.sampling == SamplingParams(mode="proposal", inra_lambda=0.25, top_k=10, max_new_tokens=1024)


def test_pipeline_presets_are_the_library_presets():
    """One definition of the sampling presets (ramjax.sampling_params.PRESETS): the pipeline's named presets are
    its proposal-side settings, and an override or a mapping changes only what it names."""
    from ramjax.experiments.pipeline import DefaultRunConfig

    default = os.path.join(REPO, "configs", "default.yaml")
    got = {k: dataclasses.astuple(v) for k, v in load_config(DefaultRunConfig, default).pipeline.sampling.items()}
    # (temperature, top_p, top_k, repetition_penalty), by hand from the paper's release settings and plain sampling
    assert got == {"sampled": (1.0, 1.0, 0, 1.0), "greedy": (0.0, 1.0, 0, 1.0), "release": (0.5, 0.95, 10, 1.05)}
    run = load_config(DefaultRunConfig, default, ["pipeline.sampling.release.top_k=5"])
    assert dataclasses.astuple(run.pipeline.sampling["release"]) == (0.5, 0.95, 5, 1.05)
    assert set(run.pipeline.sampling) == {"sampled", "greedy", "release"}
    run = C.config_from_dict(DefaultRunConfig, {"pipeline": {"sampling": {"mine": {"temperature": 0.3}},
                                                             "samples_preset": "mine"}})
    assert set(run.pipeline.sampling) == {"sampled", "greedy", "release", "mine"}
    assert run.pipeline.sampling["mine"].temperature == 0.3
