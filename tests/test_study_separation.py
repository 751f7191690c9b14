"""The separation experiment (study/separation.py): known-optimal routing recovered, the aware router's
parameter count against the agnostic one where the modality decides the routing, config errors,
and the runner's cached result."""

import json

import pytest
import torch
import yaml
from modalmoe.runtime.config import ConfigError
from modalmoe.study import StudyRunner, load_study, study_path
from modalmoe.study import separation as sep

SMALL = dict(seeds=[0, 1], n_train=1024, n_eval=1024, steps=150, modality_offsets=[0.0])


def _spec(**kw) -> sep.SeparationSpec:
    return sep.SeparationSpec(**{**SMALL, **kw}).validate()


def test_data_follows_its_construction():
    spec = _spec()
    d = sep.make_data(spec, 0, 2.0)
    K = spec.experts // spec.modalities
    assert torch.equal(d.e_train_N // K, d.m_train_N)  # the modality picks the half of the experts
    # the modalities' means differ by the offset, along a direction orthogonal to the components
    gap = d.means_MKH[1] - d.means_MKH[0]
    assert gap == pytest.approx(gap[:1].repeat(K, 0))
    assert float((gap[0] ** 2).sum()) ** 0.5 == pytest.approx(2.0)
    within = d.means_MKH[0, 1:] - d.means_MKH[0, :1]  # a·(u_k − u_0): the component directions
    assert within @ gap[0] == pytest.approx([0.0] * (K - 1), abs=1e-9)


def test_full_rank_routers_recover_the_known_routing():
    spec = _spec(ranks=[1, 16])
    d = sep.make_data(spec, 0, 0.0)
    post = sep.bayes_routing(d, d.x_eval_NH, d.m_eval_N)
    bayes = post["aware"].argmax(1)
    assert (bayes == d.e_eval_N.numpy()).mean() > 0.97  # well separated components: Bayes ≈ the generating expert
    for arm in ("aware_embedding", "aware_bias"):
        rank1, full = sep.fit_routers(spec, d, arm, 0)
        assert full["rank"] == 16 and full["accuracy"] > 0.95
        assert (full["pred"] == bayes).mean() > 0.95
        assert rank1["accuracy"] < full["accuracy"]


def test_parameter_counts_match_the_formula():
    spec = _spec(ranks=[1, 3, 16])
    for arm in sep.ARMS:
        routers = sep._LowRankRouters(arm, spec.all_ranks(), spec.hidden, spec.experts, spec.modalities)
        assert routers.params_per_router() == [sep.router_params(arm, r, spec.hidden, spec.experts, spec.modalities)
                                               for r in spec.all_ranks()]
    assert sep.router_params("agnostic", 2, 16, 8, 2) == 2 * (16 + 8) + 8


@pytest.mark.parametrize("arm", sep.ARMS)
def test_routers_trained_together_train_as_they_would_alone(arm):
    spec = _spec()
    d = sep.make_data(spec, 0, 2.0)
    onehot = torch.nn.functional.one_hot(d.m_train_N, 2).float()
    torch.manual_seed(0)
    both = sep._LowRankRouters(arm, [2, 5], spec.hidden, spec.experts, spec.modalities)
    alone = sep._LowRankRouters(arm, [5], spec.hidden, spec.experts, spec.modalities)
    with torch.no_grad():
        for p_alone, p_both in zip(alone.parameters(), both.parameters()):
            p_alone.copy_(p_both[1:2])
    opts = [torch.optim.Adam(m.parameters(), lr=spec.lr) for m in (both, alone)]
    for _ in range(5):
        for m, opt, R in zip((both, alone), opts, (2, 1)):
            opt.zero_grad()
            logits = m(d.x_train_NH, onehot)
            (torch.nn.functional.cross_entropy(logits.reshape(-1, spec.experts), d.e_train_N.repeat_interleave(R),
                                               reduction="sum") / len(d.e_train_N)).backward()
            opt.step()
    with torch.no_grad():
        torch.testing.assert_close(both(d.x_train_NH, onehot)[:, 1], alone(d.x_train_NH, onehot)[:, 0], rtol=1e-4, atol=1e-5)


def test_aware_needs_no_more_parameters_where_the_modality_decides_the_routing():
    # offset 0: the modalities differ only in covariance, which no linear gate reads
    spec = _spec(ranks=[1, 2, 3, 4, 8, 16], modality_offsets=[0.0, 8.0])
    summary = sep.summarise(spec, sep.run_separation(spec))
    for key in ("0", "8"):
        arms = summary[key]["arms"]
        ag = arms["agnostic"]["needed"]["accuracy"]
        aw = arms["aware_bias"]["needed"]["accuracy"]
        assert aw["reached"] == 2
        assert not ag["reached"] or aw["params"][0] <= ag["params"][0]
    assert summary["0"]["arms"]["agnostic"]["needed"]["accuracy"]["reached"] == 0
    assert summary["0"]["arms"]["agnostic"]["best_accuracy"][0] < 0.7  # ≈ half: it cannot tell the halves apart
    assert summary["0"]["arms"]["aware_embedding"]["needed"]["accuracy"]["reached"] == 2
    assert summary["8"]["arms"]["agnostic"]["needed"]["accuracy"]["reached"] == 2  # an obvious modality: it gets there
    lines = sep.verdict(spec, summary)
    assert len(lines) == 2 and "no agnostic router" in lines[0] and "`agnostic` reaches 0.9" in lines[1]


@pytest.mark.parametrize("override, field", [
    ("study.separation.experts=7", "study.separation.experts"),
    ("study.separation.ranks=[0,2]", "study.separation.ranks"),
    ("study.separation.ranks=[17]", "study.separation.ranks"),
    ("study.separation.arms=[agnostic,gated]", "study.separation.arms"),
    ("study.separation.modality_offsets=[-1.0]", "study.separation.modality_offsets"),
    ("study.separation.target_accuracy=1.5", "study.separation.target_accuracy"),
    ("study.separation.hidden=4", "study.separation.hidden"),
])
def test_bad_separation_blocks_name_their_field(override, field):
    with pytest.raises(ConfigError, match=f"`{field}`"):
        load_study("modality-routing", [override])


def test_a_separation_experiment_needs_the_block(tmp_path):
    data = yaml.safe_load(study_path("modality-routing").read_text())
    del data["separation"]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="needs the study's `separation:` block"):
        load_study(path)


def test_the_runner_caches_the_result_and_reruns_a_changed_block(tmp_path):
    over = ["study.separation.seeds=[0]", "study.separation.ranks=[1,4]", "study.separation.steps=20",
            "study.separation.n_train=256", "study.separation.n_eval=256", "study.separation.modality_offsets=[0.0]"]
    runner = StudyRunner(load_study("modality-routing", over), tmp_path, log=lambda _: None)
    assert "trained" in runner.separation()
    saved = json.loads((tmp_path / "separation.json").read_text())
    assert len(saved["fits"]) == 3 * 2 and saved["spec"]["ranks"] == [1, 4]
    assert runner.separation() == "separation: same block, skipped"
    changed = StudyRunner(load_study("modality-routing", over + ["study.separation.steps=21"]), tmp_path, log=lambda _: None)
    assert "trained" in changed.separation()
