"""A fingerprint of the host a measurement ran on: CPU, ISA flags, cores, library versions."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

# ISA extensions that decide whether INT8/BF16/FP16 kernels are fast (x86, plus ARM's FP16 arithmetic).
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "amx_fp16",
    "asimdhp",  # ARM: half-precision arithmetic on Advanced SIMD (the aarch64 Features line of /proc/cpuinfo)
)
INFERENCE_PRECISIONS = ("f32", "bf16", "f16")  # OpenVINO's names for the float precision a CPU computes in


@dataclass(frozen=True)
class ComputeNeed:
    """What computing in a reduced float precision needs from the CPU: the one place that says it.

    The rules are OpenVINO 2026's CPU plugin's: it lists ``BF16`` in ``OPTIMIZATION_CAPABILITIES`` on CPUs with
    AVX512_BF16 (AMX-BF16 CPUs have it too), and ``FP16`` on CPUs with AVX512-FP16 (AMX-FP16 CPUs have it too) or
    ARM FP16 arithmetic. It also lists both on AVX2-VNNI-2 CPUs, whose flags (avx_ne_convert, avx_vnni_int8)
    Linux does not show in /proc/cpuinfo: a check by flags refuses those hosts (safe side).
    """

    precision: str  # OpenVINO's inference precision name
    capability: str  # the entry in OpenVINO's CPU OPTIMIZATION_CAPABILITIES; also how messages name it
    isa_any: tuple[str, ...]  # any one of these ISA flags gives it natively
    cpu: str  # for messages: "a CPU with ..."

    def met_by(self, isa_flags: tuple[str, ...] | list[str]) -> bool:
        return any(f in isa_flags for f in self.isa_any)

    def lacking(self) -> str:
        """What a host without any of the flags is told: "this CPU has neither" (or "none of them")."""
        return "this CPU has neither" if len(self.isa_any) == 2 else "this CPU has none of them"


COMPUTE_NEEDS = {
    "bf16": ComputeNeed("bf16", "BF16", ("avx512_bf16", "amx_bf16"), "a CPU with AVX512_BF16 or AMX-BF16"),
    "f16": ComputeNeed(
        "f16", "FP16", ("avx512_fp16", "amx_fp16", "asimdhp"), "a CPU with AVX512-FP16, AMX-FP16 or ARM FP16 arithmetic"
    ),
}


def compute_need(precision: str) -> ComputeNeed | None:
    """What computing in ``precision`` needs from the CPU; None for f32 (every CPU); ValueError if unknown."""
    if precision not in INFERENCE_PRECISIONS:
        raise ValueError(f"unknown inference precision {precision!r}; known: {', '.join(INFERENCE_PRECISIONS)}")
    return COMPUTE_NEEDS.get(precision)


_LIBRARIES = ("quantgate", "onnxruntime", "onnx", "numpy", "mlflow", "openvino", "nncf", "torch")


@dataclass(frozen=True)
class Hardware:
    cpu_model: str
    arch: str
    logical_cores: int
    isa_flags: tuple[str, ...]
    libraries: dict[str, str] = field(default_factory=dict)
    python: str = platform.python_version()
    gpus: tuple[str, ...] = ()  # NVIDIA GPU names, as nvidia-smi reports them

    @property
    def int8_dot_product(self) -> bool:
        """True when the CPU has instructions that make INT8 matmuls fast (VNNI or AMX)."""
        return any(f in self.isa_flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))

    def fingerprint(self) -> str:
        """Hash of what makes latency comparable: CPU model, flags, cores (not library versions)."""
        parts: list[object] = [self.cpu_model, self.arch, self.logical_cores, self.isa_flags]
        if self.gpus:  # CPU-only hosts keep the fingerprints they had before GPUs were recorded
            parts.append(self.gpus)
        key = json.dumps(parts)
        return hashlib.sha256(key.encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> Hardware:
        """The inverse of ``as_dict`` (derived keys dropped): how a result measured on another worker comes back."""

        def strings(key: str) -> tuple[str, ...]:
            value = d.get(key) or ()
            return tuple(str(x) for x in value) if isinstance(value, list | tuple) else ()

        libraries = d.get("libraries") or {}
        cores = d.get("logical_cores")
        return cls(
            cpu_model=str(d.get("cpu_model", "")),
            arch=str(d.get("arch", "")),
            logical_cores=cores if isinstance(cores, int) else 0,
            isa_flags=strings("isa_flags"),
            libraries={str(k): str(v) for k, v in libraries.items()} if isinstance(libraries, dict) else {},
            python=str(d.get("python", "")),
            gpus=strings("gpus"),
        )

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["int8_dot_product"] = self.int8_dot_product
        d["fingerprint"] = self.fingerprint()
        return d


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str, tuple[str, ...]]:
    model, flags = platform.processor() or platform.machine(), ""
    try:
        text = path.read_text()
    except OSError:
        return model, ()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("", platform.machine(), platform.processor()):
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = value
    present = set(flags.split())
    return model, tuple(f for f in ISA_FLAGS if f in present)


def library_versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def backend_versions() -> dict[str, str]:
    """Versions that change what a compression produces: a new one means results must be made again."""
    libs = library_versions()
    return {k: v for k, v in libs.items() if k in ("quantgate", "onnx", "onnxruntime", "openvino", "nncf")}


def _gpus() -> tuple[str, ...]:
    """NVIDIA GPU names from nvidia-smi (no CUDA libraries needed); none when it is absent or fails."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ()
    if out.returncode != 0:
        return ()
    return tuple(line.strip() for line in out.stdout.splitlines() if line.strip())


def detect() -> Hardware:
    model, flags = _cpuinfo()
    return Hardware(
        cpu_model=model,
        arch=platform.machine(),
        logical_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
        isa_flags=flags,
        libraries=library_versions(),
        gpus=_gpus(),
    )
