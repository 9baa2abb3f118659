"""NNCF post-training quantization whose activation statistics are collected once per run and reused.

Collecting statistics is most of what ``nncf.quantize`` costs: it runs the model over the calibration set with an
extra output at every tensor it may quantize (measured on a real CRAFT detector: 18-30 s of a 22-33 s build; the
quantizer placement and bias correction that follow take 3-4 s). Every NNCF recipe of a run quantizes the same
FP32 model on the same calibration set, and a mixed-precision variant needs only a subset of what full INT8
needed: the statistics of one run are the same numbers each time. So statistics are kept in this process (the
build worker serves every build of a run), keyed by the model and the calibration data, and matched collector by
collector: the same target point, the same algorithm, the same reducers and aggregators. What is not there yet
(another preset's collectors) is collected and added. The rest of the pipeline is NNCF's own
(``PostTrainingQuantization.apply`` with the statistics given), so a variant is what ``nncf.quantize`` with the
same arguments would have built (tested: the same weights and fidelity).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Statistics of this many (model, calibration) pairs are kept per process: a run has one, a test session a few.
_KEEP = 3


@dataclass
class StatsMemo:
    """Collected tensor collectors of one (model, calibration) pair, and how often they were reused."""

    collectors: dict[tuple[Any, ...], Any]
    collected_passes: int = 0
    reused: int = 0


_MEMOS: OrderedDict[str, StatsMemo] = OrderedDict()


def memo_for(key: str) -> StatsMemo:
    """The statistics kept for ``key`` (created empty; the least recently used pair is dropped past ``_KEEP``)."""
    if key in _MEMOS:
        _MEMOS.move_to_end(key)
        return _MEMOS[key]
    memo = _MEMOS[key] = StatsMemo({})
    while len(_MEMOS) > _KEEP:
        _MEMOS.popitem(last=False)
    return memo


def memo_key(model: Path, calibration: Path, batch_size: int, limit: int | None) -> str:
    """What statistics depend on besides the collectors' own settings: the model and the calibration data read."""
    parts = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in (model, calibration)]
    return "|".join([*parts, str(batch_size), str(limit)])


def forget() -> None:
    """Drop every kept statistic (tests)."""
    _MEMOS.clear()


def _signature(algorithm: str, collector: Any) -> tuple[Any, ...]:
    # Algorithm keys carry the instance's hash ("MMQ_8731..."): two builds' MinMax share the part before it.
    # A collector is defined by its branches: container key -> (reducer hash, port, aggregator hash); NNCF's reducers
    # and aggregators hash by their settings.
    return (algorithm.split("_")[0], tuple(sorted(collector._stat_container_kwargs_map.items())))


def quantize(model: Any, dataset: Any, memo: StatsMemo, *, subset_size: int, **kwargs: Any) -> Any:
    """``nncf.quantize(model, dataset, subset_size=..., **kwargs)`` for an ``openvino.Model``, its first pipeline
    step's statistics taken from ``memo`` where they are there (and added to it where not)."""
    import nncf
    from nncf.common.factory import StatisticsAggregatorFactory
    from nncf.common.tensor_statistics.statistic_point import StatisticPoint, StatisticPointsContainer
    from nncf.openvino.graph.model_utils import remove_friendly_name_duplicates
    from nncf.openvino.graph.nncf_graph_builder import GraphConverter
    from nncf.openvino.graph.node_utils import get_number_if_op
    from nncf.quantization.algorithms.post_training.algorithm import PostTrainingQuantization

    if get_number_if_op(model) > 0:  # NNCF quantizes If bodies recursively, each with its own statistics
        return nncf.quantize(model, dataset, subset_size=subset_size, **kwargs)
    model = remove_friendly_name_duplicates(model)
    advanced = kwargs.get("advanced_parameters")
    algorithm = PostTrainingQuantization(subset_size=subset_size, **kwargs)
    graph = GraphConverter.create_nncf_graph(model)
    needed = algorithm.get_statistic_points(model, graph)
    given = StatisticPointsContainer()
    missing = StatisticPointsContainer()
    for name, point, collector in needed.get_tensor_collectors():
        kept = memo.collectors.get((point.target_point, _signature(name, collector)))
        (given if kept is not None else missing).add_statistic_point(
            StatisticPoint(point.target_point, kept if kept is not None else collector, name)
        )
    if missing:
        aggregator = StatisticsAggregatorFactory.create(model, dataset)
        aggregator.register_statistic_points(missing)
        aggregator.collect_statistics(model, graph)
        memo.collected_passes += 1
        for name, point, collector in aggregator.statistic_points.get_tensor_collectors():
            memo.collectors[(point.target_point, _signature(name, collector))] = collector
            given.add_statistic_point(StatisticPoint(point.target_point, collector, name))
    else:
        memo.reused += 1
    quantized = algorithm.apply(model, graph, given, dataset)
    _finish_like_nncf(quantized, advanced, subset_size, kwargs)
    return quantized


def _finish_like_nncf(quantized: Any, advanced: Any, subset_size: int, kwargs: dict[str, Any]) -> None:
    """What ``nncf.quantize`` does after the algorithm on OpenVINO: compress FakeQuantize weights, record settings."""
    from nncf.openvino.quantization.backend_parameters import is_weight_compression_needed
    from nncf.openvino.rt_info import dump_parameters
    from nncf.quantization.advanced_parameters import convert_to_dict_recursively
    from openvino._offline_transformations import compress_quantize_weights_transformation

    if is_weight_compression_needed(advanced):
        compress_quantize_weights_transformation(quantized)
    target = kwargs.get("target_device")
    dump_parameters(
        quantized,
        {
            "preset": kwargs.get("preset"),
            "target_device": getattr(target, "value", target),
            "subset_size": subset_size,
            "fast_bias_correction": kwargs.get("fast_bias_correction", True),
            "model_type": kwargs.get("model_type"),
            "ignored_scope": kwargs.get("ignored_scope"),
            "advanced_parameters": convert_to_dict_recursively(advanced),
        },
    )
