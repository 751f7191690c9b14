"""A tiny study end to end: report files, resumability, the derived load target, stale-config refusal."""

import json

import numpy as np
import pytest
import yaml
from modalmoe.launch.cli import main
from modalmoe.runtime.config import ConfigError
from modalmoe.study import StudyRunner, canonical_target, load_study
from study_utils import TINY_STUDY, run_tiny_study

@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return run_tiny_study(tmp_path_factory.mktemp("study"), TINY_STUDY)


def test_the_study_writes_its_report(study):
    _, out, report, lines = study
    assert report == out / "report.md" and report.is_file()
    text = report.read_text()
    for section in ["## All arms", "## 1. aware vs target", "## 4. dynamics", "## 5. cka", "## 6. transfer", "± "]:
        assert section in text, section
    for png in ["bars", "eval_loss", "load", "specialisation", "agreement", "cka", "cka_bars", "transfer"]:
        p = out / "plots" / f"{png}.png"
        assert p.is_file() and p.stat().st_size > 1000, png
        assert f"plots/{png}.png" in text
    results = json.loads((out / "results.json").read_text())
    assert not results["missing"] and len(results["runs"]) == 8
    assert set(results["arms"]) == {"aware", "target", "long", "aware_shifted"}
    aware = results["arms"]["aware"]
    assert aware["caption_loss"][2] == 2 and 0.0 <= aware["spec"][0] <= 1.0
    assert "agreement_with_target_trained" in aware["transfer"]
    assert sum("trained in" in line for line in lines) == 8


def test_long_arm_trains_longer_and_is_tracked(study):
    _, out, _, _ = study
    analysis = json.loads((out / "runs" / "long-s0" / "analysis.json").read_text())
    assert analysis["step"] == 8
    assert [t["step"] for t in analysis["track"]] == [4, 8]
    routes = np.load(out / "runs" / "long-s0" / "routes.npz")
    assert routes["track__4"].shape == routes["final__source"].shape
    # once probed, only the final (resume) checkpoint is kept
    assert [p.name for p in (out / "runs" / "long-s0" / "checkpoints").glob("step_*")] == ["step_00000008"]


def test_derived_target_is_the_aware_arms_utilisation(study):
    _, out, _, _ = study
    tables = []
    for seed in (0, 1):
        analysis = json.loads((out / "runs" / f"aware-s{seed}" / "analysis.json").read_text())
        tables += [layer["load_ME"] for layer in analysis["probe"]["source"]["layers"]]
    expected = canonical_target(tables)
    saved = json.loads((out / "targets" / "target.json").read_text())
    assert saved["from"] == "aware" and saved["target_ME"] == expected
    for seed in (0, 1):
        cfg = yaml.safe_load((out / "runs" / f"target-s{seed}" / "config.yaml").read_text())
        assert cfg["model"]["moe"]["lb_modality_target"] == expected
        assert cfg["model"]["moe"]["router"] == "topk"


def test_second_invocation_skips_complete_runs_and_resumes_an_interrupted_one(study):
    path, out, _, _ = study
    done = out / "runs" / "aware-s1"
    stamp = (done / "summary.json").stat().st_mtime_ns
    interrupted = out / "runs" / "long-s1"
    (interrupted / "summary.json").unlink()
    (interrupted / "analysis.json").unlink()
    lines: list[str] = []
    StudyRunner(load_study(path), out, log=lines.append).run()
    assert (done / "summary.json").stat().st_mtime_ns == stamp
    skipped = [line for line in lines if "complete, skipped; analysed, skipped" in line]
    assert len(skipped) == 7
    (resumed,) = [line for line in lines if "long-s1" in line]
    assert "(resumed)" in resumed and (interrupted / "summary.json").is_file()


def test_a_changed_config_is_refused_not_mixed(study):
    path, out, _, _ = study
    with pytest.raises(ConfigError, match="different config"):
        StudyRunner(load_study(path, ["model.moe.top_k=1"]), out, log=lambda _: None).run()


def test_cli_report_only_and_bad_study_name(study, capsys):
    path, out, _, _ = study
    assert main(["study", str(path), "--out", str(out), "--report-only"]) == 0
    assert "report:" in capsys.readouterr().out
    assert main(["study", "no-such-study"]) == 2
    assert "no study named" in capsys.readouterr().err


def test_study_validation_changes_nothing_and_checks_the_shift():
    from modalmoe.runtime.config import to_dict

    spec = load_study("modality-routing")
    before = to_dict(spec)
    spec.validate()
    assert to_dict(spec) == before
    with pytest.raises(ConfigError, match=r"`study\.data\.shifted\.shift\.noise_std`"):
        load_study("modality-routing", ["study.data.shifted.shift.noise_std=-1"])
