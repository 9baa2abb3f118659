import numpy as np

from quantgate.validators.accuracy import top1
from quantgate.validators.fidelity import cosine_per_row


def test_cosine_per_row_is_one_for_scaled_copies_and_handles_zero_rows() -> None:
    a = np.array([[1.0, 2.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    b = np.array([[2.0, 4.0], [0.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(cosine_per_row(a, b), [1.0, 1.0, 0.0, 0.0], atol=1e-7)


def test_top1() -> None:
    outputs = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert top1(outputs, np.array([1, 0, 0])) == 2 / 3
