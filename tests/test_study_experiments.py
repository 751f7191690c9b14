"""The compute, concept and separation experiments wired into a tiny study: per-run outputs, report
sections and plots, and resumability (a second invocation recomputes nothing)."""

import copy
import json

import numpy as np
import pytest
import yaml
from modalmoe.study import StudyRunner, load_study
from modalmoe.study.compute import moe_flops_per_token
from modalmoe.study.concepts import CONCEPTS, probe_concepts
from modalmoe.train.job_config import load_job_config
from study_utils import TINY_STUDY, run_tiny_study

STUDY = copy.deepcopy(TINY_STUDY)
STUDY.update({
    "name": "tiny-experiments",
    "data": {"source": {"kind": "demo", "n_train": 48, "n_eval": 24}},
    "arms": {
        "aware": {"set": {"model.moe.router": "modality"}},
        "agnostic": {"set": {"model.moe.router": "topk"}},
        "aware_k12": {"set": {"model.moe.router": "modality", "model.moe.modality_top_k": [1, 2]}},
    },
    "transfer": None,
    "separation": {"seeds": [0], "ranks": [1, 16], "steps": 20, "n_train": 256, "n_eval": 256, "modality_offsets": [0.0, 8.0]},
    "experiments": [
        {"title": "7. compute", "kind": "compute", "arms": ["aware", "aware_k12", "agnostic"]},
        {"title": "8. concepts", "kind": "concepts", "arms": ["aware", "agnostic"]},
        {"title": "9. separation", "kind": "separation"},
    ],
})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return run_tiny_study(tmp_path_factory.mktemp("study"), STUDY)


def test_report_has_the_new_sections_and_plots(study):
    _, out, report, _ = study
    text = report.read_text()
    for section in ["## 7. compute", "## 8. concepts", "## 9. separation", "MoE MFLOPs", "u(e; c \\| m)", "Bayes-optimal"]:
        assert section in text, section
    for png in ["frontier", "concepts", "separation"]:
        p = out / "plots" / f"{png}.png"
        assert p.is_file() and p.stat().st_size > 1000, png
        assert f"plots/{png}.png" in text


def test_capacity_per_modality_is_measured_and_matches_the_config(study):
    _, out, _, _ = study
    arms = json.loads((out / "results.json").read_text())["arms"]
    assert arms["aware"]["slots_per_token_image"][0] == pytest.approx(2.0)
    assert arms["aware_k12"]["slots_per_token_image"][0] == pytest.approx(1.0)
    assert arms["aware_k12"]["slots_per_token_text"][0] == pytest.approx(2.0)
    # image tokens hold fewer of the slots when they route to one expert only
    assert arms["aware_k12"]["slot_share_image"][0] < arms["aware"]["slot_share_image"][0]
    cfg = load_job_config(out / "runs" / "aware_k12-s0" / "config.yaml").model
    flops = moe_flops_per_token(cfg)
    H, F, E = cfg.hidden_size, cfg.moe.ffn_hidden_size, cfg.moe.num_experts
    per_slot = 2 * 2 * H * F  # gelu expert: H·F in, F·H out
    assert flops["text"] - flops["image"] == pytest.approx(len(cfg.moe_layers) * per_slot)
    assert flops["image"] == pytest.approx(len(cfg.moe_layers) * (per_slot + 2 * H * E))
    assert arms["aware_k12"]["moe_flops_image"][0] == pytest.approx(flops["image"])
    assert arms["aware_k12"]["moe_flops"][0] < arms["aware"]["moe_flops"][0]


def test_concepts_are_measured_per_run_on_aligned_labels(study):
    path, out, _, _ = study
    c = json.loads((out / "runs" / "aware-s0" / "concepts.json").read_text())
    assert c["available"] and set(c["concepts"]) <= set(CONCEPTS)
    assert any(n.startswith("colour:") for n in c["concepts"]) and any(n.startswith("relation:") for n in c["concepts"])
    assert [lay["layer"] for lay in c["layers"]] == [0, 1]
    E = 4
    for lay in c["layers"]:
        for key in ("u", "cu"):
            u = np.array(lay[key])
            assert u.shape == (E, len(c["concepts"])) and (u >= 0).all() and (u <= 1).all()
    specs = [sp for r in ("aware", "agnostic") for seed in (0, 1)
             for lay in json.loads((out / "runs" / f"{r}-s{seed}" / "concepts.json").read_text())["layers"] for sp in lay["specialists"]]
    for _e, concept, cu, _um, parts in specs:  # where the within-modality MI sits: relations are text only
        assert len(parts) == 2 and min(parts) >= 0 and cu >= 0.2
        if concept.startswith("relation:"):
            assert parts[0] == 0.0 and parts[1] > 0
    # the labels follow the probe's token order: relation words only on text tokens, patches only on images
    runner = StudyRunner(load_study(path), out, log=lambda _: None)
    cfg = load_job_config(out / "runs" / "aware-s0" / "config.yaml")
    batches = runner._probe_batches("source", cfg)
    paths = runner.data_paths()["source"]
    labels = probe_concepts(batches.batches, paths["eval"], paths["tokenizer"], cfg.data.image_size, cfg.data.patch_size)
    assert labels.shape == (len(batches.modality_N), len(CONCEPTS))
    rel = [j for j, n in enumerate(CONCEPTS) if n.startswith("relation:")]
    assert labels[:, rel].any() and not labels[batches.modality_N == 0][:, rel].any()
    assert labels[batches.modality_N == 0].any()  # some patches show an object


def test_a_second_invocation_recomputes_nothing_and_fills_a_missing_concepts_file(study):
    path, out, _, _ = study
    sep_stamp = (out / "separation.json").stat().st_mtime_ns
    kept = out / "runs" / "aware-s1" / "concepts.json"
    stamp = kept.stat().st_mtime_ns
    missing = out / "runs" / "agnostic-s0" / "concepts.json"
    missing.unlink()
    lines: list[str] = []
    StudyRunner(load_study(path), out, log=lines.append).run()
    assert "separation: same block, skipped" in lines
    assert (out / "separation.json").stat().st_mtime_ns == sep_stamp and kept.stat().st_mtime_ns == stamp
    assert sum("analysed, skipped; concepts skipped" in line for line in lines) == 5
    (again,) = [line for line in lines if "agnostic-s0" in line]
    assert "analysed, skipped; concepts measured" in again and missing.is_file()


def test_parallel_runs_start_a_derived_arm_once_its_source_is_done(tmp_path, monkeypatch):
    """--jobs: the derived-target arm comes right after its source arm and waits only for it."""
    import threading
    import time

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY_STUDY, "separation": None}, sort_keys=False))
    events, lock = [], threading.Lock()

    def fake_one(self, plan, index, total):
        with lock:
            events.append(("start", plan.arm))
        time.sleep(0.3 if plan.arm == "aware" else 0.02)
        with lock:
            events.append(("end", plan.arm))
        return True

    monkeypatch.setattr(StudyRunner, "_one", fake_one)
    runner = StudyRunner(load_study(path), tmp_path / "out", jobs=5, log=lambda _: None)
    assert [p.arm for p in runner.plans()][::2] == ["aware", "target", "long", "aware_shifted"]
    runner.run(report=False)
    last_source = max(i for i, e in enumerate(events) if e == ("end", "aware"))
    first_derived = min(i for i, e in enumerate(events) if e == ("start", "target"))
    assert first_derived > last_source
    assert sorted(a for k, a in events if k == "end") == sorted(p.arm for p in runner.plans())
    # the other arms did not wait for the source arm (with workers to spare: a waiting run holds one)
    assert min(i for i, e in enumerate(events) if e == ("start", "long")) < last_source
