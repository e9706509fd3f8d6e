"""The metric registry: each metric exists once, every evaluated metric is registered, readers show its definition."""

from __future__ import annotations

import html
import json
import re

import pytest
import torch
from explain_toys import TOY_CONCEPTS, single_threaded, toy_transparent  # noqa: F401 - single_threaded: a fixture
from synthetic import make_batch
from torch import nn

from pellucid.models import create_model
from pellucid.training.bundle import metric_definitions
from pellucid.training.elements.callback import ExplanationEvaluator
from pellucid.training.elements.registry import (
    GROUPS,
    DuplicateMetricError,
    get_metric,
    list_metrics,
    metric_for_key,
    register_metric,
    unregister_metric,
)
from pellucid.training.elements.results import FiveElementResults, MetricResult
from pellucid.training.outputs.report import build_report
from pellucid.training.outputs.report_evaluation import ModelEvaluation
from pellucid.training.outputs.report_template import render_html

pytestmark = pytest.mark.usefixtures("single_threaded")


def evaluate(model: nn.Module, spatial_dims: int = 2) -> FiveElementResults:
    """A five-element evaluation of a tiny model on two synthetic batches (every optional batch key present)."""
    evaluator = ExplanationEvaluator(concept_specs=getattr(model, "concept_specs", None),
                                     data_concept_specs=TOY_CONCEPTS, deletion_samples=4,
                                     deletion_fractions=(0.0, 0.5, 1.0))
    model.eval()
    for seed in range(2):
        batch = make_batch(spatial_dims, batch_size=4, seed=seed, concepts=TOY_CONCEPTS)
        with torch.no_grad():
            evaluator.update(model, model(batch["image"], explain=True), batch)
    return evaluator.compute()


@pytest.fixture(scope="module")
def evaluations() -> dict[str, FiveElementResults]:
    torch.manual_seed(0)
    protopnet = create_model("protopnet", 2, in_channels=1, num_classes=3)
    return {"toy": evaluate(toy_transparent(2)), "protopnet": evaluate(protopnet)}


def test_a_second_registration_of_a_name_raises_naming_the_metric_and_both_modules() -> None:
    register_metric("registry_test_metric", "localization", "A metric for this test.", module="first.module")
    try:
        with pytest.raises(DuplicateMetricError, match=r"'registry_test_metric'.*first\.module.*second\.module"):
            register_metric("registry_test_metric", "transparency", "Another meaning.", module="second.module")
        with pytest.raises(DuplicateMetricError, match=r"pellucid\.training\.elements\.results"):
            register_metric("pointing_game", "localization", "Another pointing game.", module="second.module")
        with pytest.raises(DuplicateMetricError, match=r"concept/\{concept\}/accuracy"):  # inside a family
            register_metric("concept/irregular/accuracy", "physical_attribution", "A copy.", module="second.module")
    finally:
        unregister_metric("registry_test_metric")
    with pytest.raises(ValueError, match=r"element must be one of"):
        register_metric("registry_test_other", "beauty", "Not an element.", module="first.module")


def test_families_bind_their_members_and_unknown_names_list_the_registered_ones() -> None:
    member = get_metric("concept_mae/diameter_mm", unit="mm")
    assert (member.name, member.unit, member.higher_is_better) == ("concept_mae/diameter_mm", "mm", False)
    assert "diameter_mm" in member.definition and "{" not in member.definition
    assert get_metric("intervention_auc_random").definition.count("random") == 1
    with pytest.raises(KeyError, match=r"no registered metric 'prototype_beauty'.*pointing_game"):
        get_metric("prototype_beauty")
    assert {m.element for m in list_metrics()} <= set(GROUPS)
    assert all(m.element == "actionability" for m in list_metrics("actionability"))


def test_the_two_purities_are_distinct_registered_metrics() -> None:
    pip_net, lesion_type = get_metric("prototype_purity"), get_metric("prototype_lesion_type_purity")
    assert "PIP-Net" in pip_net.definition and "PIP-Net" not in lesion_type.definition
    assert pip_net.definition != lesion_type.definition


def test_every_metric_an_evaluation_produces_is_registered_once_with_its_definition(evaluations) -> None:
    for name, results in evaluations.items():
        names = [m.name for m in results.metrics]
        assert len(names) == len(set(names)), name
        for result in results.metrics:
            assert result.metric == get_metric(result.name, **({"unit": result.unit} if result.unit else {}))
    protopnet = evaluations["protopnet"]
    assert protopnet.value("prototype_purity") is not None  # PIP-Net purity, from the prototype tools
    assert protopnet.value("prototype_lesion_type_purity") is not None  # the evaluator's image-level purity
    toy = evaluations["toy"]
    assert toy.value("intervention_gain") is not None and toy.value("intervention_auc_random") is not None
    assert [c.name for c in toy.curves if c.name.startswith("intervention")] == ["intervention_uncertainty",
                                                                                  "intervention_random"]


def test_a_row_cannot_repeat_a_name() -> None:
    with pytest.raises(ValueError, match=r"\['pointing_game'\] appear more than once"):
        FiveElementResults(metrics=[MetricResult.of("pointing_game", 0.5), MetricResult.of("pointing_game", 0.7)])


def test_the_report_card_shows_each_value_beside_the_definition_registered_under_its_name(evaluations,
                                                                                          tmp_path) -> None:
    roles = {"model": evaluations["protopnet"], "baseline": evaluations["toy"]}
    report = build_report({role: ModelEvaluation(role, "", {}, results, None) for role, results in roles.items()},
                          {"config": None, "class": "synthetic", "split": "test"},
                          {role: {} for role in roles})
    page = render_html(report, tmp_path)
    shown = 0
    for element, section in report["elements"].items():
        for row in section["metrics"]:
            metric = get_metric(row["name"], **({"unit": row["unit"]} if row["unit"] else {}))
            assert (metric.element, row["definition"], row["higher_is_better"]) == (element, metric.definition,
                                                                                    metric.higher_is_better)
            for role, results in roles.items():
                if row.get(role) is not None:
                    assert row[role] == results.value(row["name"])
            cell = re.search(rf"<tr><td><b>{re.escape(html.escape(row['name']))}</b></td>.*?</tr>", page)
            assert cell is not None and html.escape(metric.definition) in cell.group(0), row["name"]
            shown += 1
    assert shown >= 30
    assert json.loads(json.dumps(report))["elements"] == report["elements"]  # the JSON form holds the same rows


def test_bundle_metadata_keys_resolve_to_registered_metrics_old_names_included() -> None:
    assert metric_for_key("visual_recognizability/prototype_purity") == get_metric("prototype_purity")
    assert metric_for_key("test/accuracy").element == "performance"
    old = metric_for_key("physical_attribution/concept/diameter_mm/mae_mm")  # older bundles' duplicate of concept_mae
    assert old is not None and old.name == "concept_mae/diameter_mm"
    described = metric_definitions({"metrics": {"localization/pointing_game": 0.9, "unknown/thing": 1.0}})
    assert described["localization/pointing_game"]["definition"] == get_metric("pointing_game").definition
    assert described["unknown/thing"]["definition"] is None
