"""The config tree: YAML + overrides, strict keys and types, and validation that names the field."""

import copy
from collections import Counter

import pytest
import yaml
from modalmoe.runtime.config import ConfigError, apply_overrides, from_dict, to_dict
from modalmoe.train.job_config import JobConfig, load_job_config


def test_overrides_parse_yaml_values_into_nested_sections():
    d = apply_overrides({}, ["model.moe.top_k=1", "train.lr=1e-3", "model.moe.modality_top_k=[1, 2]", "train.name=x"])
    cfg = from_dict(JobConfig, d)
    assert cfg.model.moe.top_k == 1 and cfg.train.lr == 1e-3 and cfg.model.moe.modality_top_k == [1, 2]


def test_yaml_file_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  hidden_size: 32\n  moe:\n    hidden_size: 32\ntrain:\n  steps: 7\n")
    cfg = load_job_config(p, ["train.steps=9"])
    assert cfg.model.hidden_size == 32 and cfg.train.steps == 9


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model.moe.topk=2"], r"unknown config key\(s\) \['topk'\] under `model.moe`"),
        (["train.steps=ten"], r"`train.steps`: expected an integer"),
        (["train.progress=3"], r"`train.progress`: expected true/false"),
        (["nonsense"], r"must look like `section.key=value`"),
    ],
)
def test_bad_keys_and_types_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_job_config(None, overrides)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["model.num_heads=3"], "model.num_heads"),
        (["model.moe.hidden_size=64"], "model.moe.hidden_size"),
        (["model.moe.router=bogus"], "model.moe.router"),
        (["model.moe.top_k=99"], "model.moe.top_k"),
        (["model.moe.lb_coef=-0.1"], "model.moe.lb_coef"),
        (["train.lr=0"], "train.lr"),
        (["data.patch_size=4"], "data.patch_size"),
        (["parallel.zero_stage=3"], "parallel.zero_stage"),
    ],
)
def test_validation_names_the_field(overrides, field):
    cfg = load_job_config(None, overrides)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        cfg.validate(check_paths=False)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_job_config(tmp_path / "nope.yaml")


def test_config_round_trips_through_yaml(tmp_path):
    cfg = load_job_config(None, ["model.moe.router=modality", "train.steps=3"])
    p = tmp_path / "resolved.yaml"
    p.write_text(cfg.to_yaml())
    again = load_job_config(p)
    assert again == cfg


# ---- one owner per fact: the data sizes are the model's -----------------------------------------


@pytest.mark.parametrize("name", ["image_size", "patch_size", "max_text_len"])
def test_data_sizes_come_from_the_model(name, tmp_path):
    cfg = load_job_config(None, ["model.image_size=64", "model.patch_size=16", "model.max_text_len=12"])
    assert getattr(cfg.data, name) == getattr(cfg.model, name)
    assert cfg.data.seq_len == cfg.model.max_seq_len
    assert name not in yaml.safe_load(cfg.to_yaml())["data"]
    p = tmp_path / "resolved.yaml"
    p.write_text(cfg.to_yaml())
    again = load_job_config(p)
    assert again == cfg and getattr(again.data, name) == getattr(cfg.model, name)
    again.validate(check_paths=False)


@pytest.mark.parametrize("name", ["image_size", "patch_size", "max_text_len"])
def test_a_size_set_under_data_is_refused_even_when_it_agrees(name, tmp_path):
    value = getattr(JobConfig().model, name)
    for cfg in (
        load_job_config(None, [f"data.{name}={value}"]),
        load_job_config(_write(tmp_path / "c.yaml", f"data:\n  {name}: {value}\n")),
    ):
        with pytest.raises(ConfigError, match=rf"`data\.{name}`.*set model\.{name}={value} instead"):
            cfg.validate(check_paths=False)


def test_a_model_size_changed_after_building_is_caught():
    cfg = load_job_config(None, [])
    cfg.model.image_size = 64
    with pytest.raises(ConfigError, match=r"`data\.image_size`: is 32 but model\.image_size is 64"):
        cfg.validate(check_paths=False)


def test_size_errors_of_the_data_pipeline_name_the_model_field():
    cfg = load_job_config(None, ["model.max_text_len=2"])  # the model takes 2, the pipeline needs 3
    with pytest.raises(ConfigError, match=r"`model\.max_text_len`: must be >= 3"):
        cfg.validate(check_paths=False)
    with pytest.raises(ConfigError, match=r"`model\.channels`"):
        load_job_config(None, ["model.channels=1"]).validate(check_paths=False)


# ---- validate() only checks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.moe.router=modality_gate", "model.moe.modality_top_k=[1, 2]", "model.moe.capacity_factor=1.25",
         "model.hidden_size=64", "model.moe_every=2", "model.num_layers=4", "model.image_size=48",
         "model.patch_size=16", "model.max_text_len=20", "train.steps=7", "parallel.tp=2", "data.batch_size=8"],
    ],
)
def test_validate_changes_nothing(overrides):
    for cfg in (load_job_config(None, overrides), from_dict(JobConfig, apply_overrides({}, overrides))):
        before, snapshot = to_dict(cfg), copy.deepcopy(cfg)
        assert cfg.validate(check_paths=False) is cfg
        cfg.validate(check_paths=False)
        assert to_dict(cfg) == before and cfg == snapshot and cfg.data_sizes_given == snapshot.data_sizes_given


def test_a_training_start_validates_each_section_once(demo, tmp_path, monkeypatch):
    from modalmoe.launch.cli import main
    from modalmoe.models.config import ModelConfig
    from modalmoe.runtime.data import DataConfig
    from modalmoe.runtime.moe import MoEConfig
    from modalmoe.train.job_config import ParallelConfig, TrainConfig
    from parity_utils import MODEL

    calls = Counter()
    for cls in (JobConfig, ModelConfig, MoEConfig, DataConfig, TrainConfig, ParallelConfig):
        def counted(self, *a, _orig=cls.validate, _name=cls.__name__, **kw):
            calls[_name] += 1
            return _orig(self, *a, **kw)
        monkeypatch.setattr(cls, "validate", counted)
    args = [*MODEL, "train.steps=1", "train.eval_batches=1", "train.retrieval_size=8", "data.batch_size=8",
            f"train.run_dir={tmp_path}/run"]
    assert main(["train", "--demo-dir", str(demo), "--set", *args]) == 0
    assert calls == {n: 1 for n in ("JobConfig", "ModelConfig", "MoEConfig", "DataConfig", "TrainConfig", "ParallelConfig")}


def _write(path, text):
    path.write_text(text)
    return path
