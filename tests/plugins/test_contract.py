"""The built-in plugins pass the contract suite a plugin author runs (quantgate.testing)."""

from __future__ import annotations

import pytest

from quantgate.plugins.base import Backend
from quantgate.plugins.onnxruntime import OnnxRuntimeBackend
from quantgate.plugins.openvino import OpenVinoBackend
from quantgate.plugins.tensorrt import TensorRtBackend
from quantgate.testing import BackendContract, ValidatorContract
from quantgate.validators.accuracy import AccuracyValidator
from quantgate.validators.base import Validator
from quantgate.validators.fidelity import FidelityValidator
from quantgate.validators.latency import LatencyValidator
from quantgate.validators.size import SizeValidator


class TestOnnxRuntimeContract(BackendContract):
    @pytest.fixture()
    def backend(self) -> Backend:
        return OnnxRuntimeBackend()


class TestOpenVinoContract(BackendContract):
    @pytest.fixture()
    def backend(self) -> Backend:
        return OpenVinoBackend()


class TestTensorRtContract(BackendContract):
    @pytest.fixture()
    def backend(self) -> Backend:
        return TensorRtBackend()


@pytest.mark.parametrize("factory", [AccuracyValidator, FidelityValidator, LatencyValidator, SizeValidator])
class TestValidatorContract(ValidatorContract):
    @pytest.fixture()
    def validator(self, factory: type) -> Validator:
        instance: Validator = factory()
        return instance
