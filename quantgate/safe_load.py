"""Loading registered models without running code from them: torch.export ``.pt2`` archives and skops sklearn files.

``torch.export.load`` unpickles tensor subclasses, custom and opaque objects with ``weights_only=False``, falls back
to ``weights_only=False`` when the sample inputs do not load safely, dlopens AOTInductor libraries, evaluates every
symbolic-shape expression with ``sympy.sympify`` (which is ``eval``), and generates Python source from the graph's
names. So before torch reads an archive, every record and every string in it is checked here: only raw tensor
records, JSON, and sample inputs that load with ``weights_only=True``; expressions in sympy's ``srepr`` grammar
with known functions only; names that cannot become code. Anything else is refused (``UnsafeModel``).
"""

from __future__ import annotations

import io
import json
import re
import tokenize
import unicodedata
import zipfile
from pathlib import Path
from typing import Any

from quantgate.errors import InvalidModel, UnsafeModel

# Calls an expression may make: the sympy core classes ``srepr`` writes, and torch's own sympy functions
# (torch._export.serde.serialize's ``sympy_functions``).
_SYMPY_CALLS = frozenset({
    "Symbol", "Dummy", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Mod", "floor",
    "ceiling", "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan",
    "GreaterThan", "Equality", "Unequality", "And", "Or", "Not", "Piecewise", "ExprCondPair", "BooleanTrue",
    "BooleanFalse", "Infinity", "NegativeInfinity", "NaN", "Half", "One", "Zero", "NegativeOne",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift",
    "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "OpaqueUnaryFn_sqrt",
    "OpaqueUnaryFn_exp", "OpaqueUnaryFn_log", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or",
})  # fmt: skip
_SYMPY_KEYWORDS = frozenset({
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "infinite", "rational",
    "zero", "nonzero", "even", "odd", "commutative", "precision", "evaluate",
})  # fmt: skip
_SYMPY_CONSTANTS = frozenset({"oo", "zoo", "nan", "pi", "E", "I", "True", "False"})
_SYMBOL_NAME = re.compile(r"[a-z]{1,4}\d+")
_STRING_LITERAL = re.compile(r"'[A-Za-z0-9_.+\-]*'")
_OPERATORS = frozenset(
    ["+", "-", "*", "/", "**", "//", "%", "(", ")", ",", "=", "<", ">", "<=", ">=", "==", "!=", "&", "|", "~"]
)
# Strings torch keeps as text (comments, pytree specs, string arguments it repr()s): any printable text.
_FREE_TEXT_KEYS = frozenset(
    {"stack_trace", "nn_module_stack", "torch_fn", "source_fn_stack", "custom", "in_spec", "out_spec",
     "as_string", "as_strings", "torch_version", "schema_version", "description"}
)  # fmt: skip
# Everything else is a name, a dotted path or an enum value: nothing that could become code in FX's generated source.
_NAME = re.compile(r"[A-Za-z0-9_.:\-]*")
_TARGET = re.compile(
    r"torch\.ops\.[A-Za-z0-9_]+(\.[A-Za-z0-9_]+){1,2}|torch\._?sym_[a-z_]+|_operator\.[a-z_]+|math\.[a-z_]+"
)
_SAFE_RECORD = re.compile(r"[A-Za-z0-9_.+\-]{1,64}\n?")


def check_expression(text: str) -> None:
    """Refuse a symbolic-shape expression outside sympy's ``srepr`` grammar (torch would ``eval`` it)."""
    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type not in _IGNORED]
    except (tokenize.TokenError, SyntaxError, IndentationError):
        raise UnsafeModel(f"pt2 archive: expression {text[:80]!r} does not parse") from None
    for i, tok in enumerate(tokens):
        following = tokens[i + 1].string if i + 1 < len(tokens) else ""
        if tok.type == tokenize.NAME:
            if following == "(":
                ok = tok.string in _SYMPY_CALLS
            elif following == "=":
                ok = tok.string in _SYMPY_KEYWORDS
            else:
                ok = tok.string in _SYMPY_CONSTANTS or bool(_SYMBOL_NAME.fullmatch(tok.string))
        elif tok.type == tokenize.NUMBER:
            ok = True
        elif tok.type == tokenize.STRING:
            ok = bool(_STRING_LITERAL.fullmatch(tok.string))
        else:
            ok = tok.type == tokenize.OP and tok.string in _OPERATORS
        if not ok:
            raise UnsafeModel(f"pt2 archive: expression {text[:80]!r} holds {tok.string[:40]!r}, refused")


_IGNORED = (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.INDENT, tokenize.DEDENT)


def _printable(text: str, *, lines: bool = False) -> bool:
    # Python treats \r, \f, \v and a few Unicode separators as line breaks too, and torch splits stack traces on
    # \n only: such a character would end a generated comment. ``lines``: text torch reads line by line.
    return not any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") and not (lines and ch in "\n\t") for ch in text)


def check_program_json(node: Any, key: str = "", where: str = "") -> None:
    """Walk a serialized ExportedProgram (``models/<name>.json``) and refuse any string that is not safe to hand
    to torch's deserializer (see the module docstring)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if not isinstance(k, str) or not (_NAME.fullmatch(k) or (key in _FREE_TEXT_KEYS and _printable(k))):
                raise UnsafeModel(f"pt2 archive: key {str(k)[:60]!r} under {where or 'the program'} is not a name")
            # Inside a free-text field (a metadata dict), nested keys are free text too.
            check_program_json(v, key if key in _FREE_TEXT_KEYS else k, f"{where}.{k}" if where else k)
    elif isinstance(node, list):
        for v in node:
            check_program_json(v, key, where)
    elif isinstance(node, str):
        _check_string(node, key, where)


def _check_string(text: str, key: str, where: str) -> None:
    if not _printable(text, lines=key == "stack_trace"):
        raise UnsafeModel(f"pt2 archive: {where} holds control characters")
    if key == "expr_str":
        check_expression(text)
    elif key == "target":
        if not _TARGET.fullmatch(text):
            raise UnsafeModel(f"pt2 archive: {where} calls {text[:80]!r}, which is not a torch operator")
    elif key not in _FREE_TEXT_KEYS and not _NAME.fullmatch(text):
        raise UnsafeModel(f"pt2 archive: {where} holds {text[:60]!r}, which is not a name")


def check_pt2(path: Path) -> None:
    """Refuse a ``.pt2`` archive unless torch can read it without unpickling or running anything from it."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidModel(f"{path.name} is not a pt2 archive: {exc}") from None
    with archive:
        names = [i.filename for i in archive.infolist() if not i.is_dir()]
        prefix = _archive_prefix(names, path)
        inner = [n[len(prefix) :] for n in names]
        if any(n.startswith(("data/aotinductor/", "data/executorch/")) for n in inner):
            raise UnsafeModel(f"{path.name} bundles compiled native code (AOTInductor/ExecuTorch), refused")
        if not any(n.startswith("models/") and n.endswith(".json") for n in inner):
            raise UnsafeModel(f"{path.name} is a pt2 archive of the old format (pickled), refused")
        raw = _raw_tensor_records(archive, prefix, inner)
        for name in inner:
            record = archive.read(prefix + name)
            if name in raw:
                continue
            if name.startswith("models/") and name.endswith(".json"):
                check_program_json(_json(record, name, path), where=name.removeprefix("models/"))
            elif name.startswith("data/sample_inputs/"):
                _check_weights_only(record, name, path)
            elif not _text_record(record, name):
                raise UnsafeModel(f"{path.name}: record {name} is not plain tensor data or JSON (a pickle?), refused")


def _archive_prefix(names: list[str], path: Path) -> str:
    marker = next((n for n in names if n.endswith("archive_format")), None)
    if marker is None:
        raise UnsafeModel(f"{path.name} has no archive_format record: not a torch.export archive, refused")
    return marker[: -len("archive_format")]


def _json(record: bytes, name: str, path: Path) -> Any:
    try:
        return json.loads(record.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise UnsafeModel(f"{path.name}: record {name} is not JSON, refused") from None


def _text_record(record: bytes, name: str) -> bool:
    """JSON, or one of the short version/format records."""
    if _SAFE_RECORD.fullmatch(record.decode("ascii", errors="replace")):
        return True
    try:
        json.loads(record.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    return True


def _raw_tensor_records(archive: zipfile.ZipFile, prefix: str, inner: list[str]) -> set[str]:
    """Records torch reads as raw bytes into a tensor; a payload config that asks for a pickle is refused."""
    raw: set[str] = set()
    for name in inner:
        folder, _, base = name.rpartition("/")
        if folder not in ("data/weights", "data/constants") or not base.endswith("_config.json"):
            continue
        config = _json(archive.read(prefix + name), name, Path(archive.filename or "pt2"))
        entries = config.get("config", {}) if isinstance(config, dict) else {}
        for fqn, entry in entries.items():
            path_name = entry.get("path_name") if isinstance(entry, dict) else None
            if (
                not isinstance(path_name, str)
                or entry.get("use_pickle") is not False
                or not path_name.startswith(("weight_", "tensor_"))
                or "/" in path_name
            ):
                raise UnsafeModel(f"pt2 archive: {folder}/{fqn} is stored as a pickled object, refused")
            raw.add(f"{folder}/{path_name}")
    return raw


def _check_weights_only(record: bytes, name: str, path: Path) -> None:
    import torch

    try:
        torch.load(io.BytesIO(record), map_location="cpu", weights_only=True)
    except Exception:  # torch raises UnpicklingError, RuntimeError, ... for anything beyond tensors and containers
        raise UnsafeModel(f"{path.name}: record {name} holds objects beyond tensors, refused") from None


def check_skops(path: Path) -> None:
    """Refuse a skops file holding types skops does not trust by default (they would be instantiated on load)."""
    from skops.io import get_untrusted_types

    try:
        untrusted = get_untrusted_types(file=path)
    except Exception as exc:  # skops raises zipfile, json and its own errors on a damaged file
        raise InvalidModel(f"{path.name} is not a readable skops file: {exc}") from None
    if untrusted:
        raise UnsafeModel(
            f"sklearn model ({path.name}) holds types skops does not trust: {', '.join(sorted(untrusted)[:5])}"
        )
