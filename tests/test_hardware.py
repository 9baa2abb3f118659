from pathlib import Path

from quantgate.hardware import _cpuinfo, detect


def test_detect_records_cpu_flags_cores_and_library_versions() -> None:
    hw = detect()
    assert hw.logical_cores >= 1
    assert "onnxruntime" in hw.libraries and "quantgate" in hw.libraries
    d = hw.as_dict()
    assert d["fingerprint"] == hw.fingerprint() and len(hw.fingerprint()) == 12


def test_int8_dot_product_comes_from_vnni_or_amx_flags(tmp_path: Path) -> None:
    f = tmp_path / "cpuinfo"
    f.write_text("model name\t: Test CPU\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    model, flags = _cpuinfo(f)
    assert model == "Test CPU"
    assert flags == ("avx2", "avx512f", "avx512_vnni")
    f.write_text("model name\t: Old CPU\nflags\t\t: fpu avx2\n")
    assert _cpuinfo(f)[1] == ("avx2",)
