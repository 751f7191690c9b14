"""The config tree: YAML + overrides, strict keys and types, and validation that names the field."""

import pytest
from modalmoe.runtime.config import ConfigError, apply_overrides, from_dict
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
