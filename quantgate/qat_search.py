"""Where quantization-aware training enters the search (the hook ``run_candidates`` calls).

QAT is expensive, so it runs only when it pays: when the policy's ``recipes`` name a QAT recipe (it is then one
candidate like the others, tried after the post-training ones), or, with ``qat.auto`` (the default), once the
post-training search is over and none of its candidates held the quality gate, within what is left of the budget.
"""

from __future__ import annotations

from dataclasses import replace

from quantgate import qat, search
from quantgate.pipeline import DataSets, Intake, PlannedRecipe, SearchState
from quantgate.plugins.base import load_backend
from quantgate.policy import Policy


def setup(
    planned: list[PlannedRecipe], taken: Intake, data: DataSets, policy: Policy, state: SearchState
) -> list[PlannedRecipe]:
    """Give the named QAT recipes (in ``planned``, replaced in place) this run's training settings and data hash;
    return the QAT recipes to try if no post-training candidate holds the quality gate.

    A QAT recipe named for a model that is not a pytorch model is refused in one line (``PolicyError``).
    """
    qat.refuse_flavor([p.recipe for p in planned], taken.flavor)
    if taken.flavor != qat.PYTORCH or taken.source_dir is None:
        return []
    ctx = qat.Context.make(
        policy, taken.source_dir, data.calibration, data.calibration_uri, data.training, data.training_uri
    )
    state.qat = ctx
    for i, p in enumerate(planned):
        if p.recipe is not None and qat.is_qat(p.recipe):
            planned[i] = replace(p, recipe=ctx.configured(p.recipe, policy))
    if not policy.qat.auto:
        return []
    named = {(p.backend, p.recipe.name) for p in planned if p.recipe is not None and qat.is_qat(p.recipe)}
    backends = dict.fromkeys(p.backend for p in planned if p.recipe is not None and not p.prepare_only)
    return [
        PlannedRecipe(name, ctx.configured(r, policy))
        for name in backends
        for r in qat.offered(load_backend(name), taken.model)
        if (name, r.name) not in named
    ]


def fallback_due(state: SearchState) -> bool:
    """The post-training search is over, some candidate was checked for quality, none held it, and time is left."""
    return state.quality_passed == 0 and state.quality_failed > 0 and not state.budget.exhausted


def enqueue(planned: list[PlannedRecipe], fallback: list[PlannedRecipe], state: SearchState) -> list[search.Planned]:
    """The fallback QAT recipes appended to ``planned``, as entries of the search's queue."""
    start = len(planned)
    planned.extend(fallback)
    state.total += len(fallback)
    return [search.Planned(start + i, p.recipe, 0.0) for i, p in enumerate(fallback) if p.recipe is not None]
