"""How each logical dtype is stored in a safetensors file.

The tree leaf records the *logical* dtype (a torch dtype name or a numpy ``dtype.str``); the
safetensors header records the *stored* dtype and shape. Where safetensors has a native code we use
it, so other tools read the tensor as-is. Where it has none, or where older safetensors releases
would reject the whole file over one unknown code, we store the raw little-endian bytes as ``U8``
with one extra trailing dimension — the file stays readable, and our reader restores the type.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UnsupportedStateError


@dataclass(frozen=True)
class StoredForm:
    """Safetensors dtype code plus the extra trailing dimension (0 when none) of a logical dtype."""

    code: str
    itemsize: int  # bytes per *logical* element
    extra_dim: int = 0


# Torch dtypes by their ``str(dtype)`` name without the ``torch.`` prefix. An explicit table, never
# ``getattr(torch, name)`` on a name read from a file.
TORCH_DTYPES: dict[str, StoredForm] = {
    "bool": StoredForm("BOOL", 1),
    "uint8": StoredForm("U8", 1),
    "int8": StoredForm("I8", 1),
    "int16": StoredForm("I16", 2),
    "uint16": StoredForm("U16", 2),
    "int32": StoredForm("I32", 4),
    "uint32": StoredForm("U32", 4),
    "int64": StoredForm("I64", 8),
    "uint64": StoredForm("U64", 8),
    "float16": StoredForm("F16", 2),
    "bfloat16": StoredForm("BF16", 2),
    "float32": StoredForm("F32", 4),
    "float64": StoredForm("F64", 8),
    "complex64": StoredForm("C64", 8),
    "complex128": StoredForm("F64", 16, 2),
    "complex32": StoredForm("F16", 4, 2),
    "float8_e4m3fn": StoredForm("F8_E4M3", 1),
    "float8_e5m2": StoredForm("F8_E5M2", 1),
    # Newer codes that older safetensors readers reject: stored as raw bytes.
    "float8_e4m3fnuz": StoredForm("U8", 1, 1),
    "float8_e5m2fnuz": StoredForm("U8", 1, 1),
    "float8_e8m0fnu": StoredForm("U8", 1, 1),
    "float4_e2m1fn_x2": StoredForm("U8", 1, 1),
}

# Bytes per element of every safetensors code we write or accept in a header.
SAFETENSORS_ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip

_NUMPY_CODES: dict[str, str] = {
    "b1": "BOOL", "u1": "U8", "i1": "I8", "i2": "I16", "u2": "U16", "i4": "I32", "u4": "U32",
    "i8": "I64", "u8": "U64", "f2": "F16", "f4": "F32", "f8": "F64", "c8": "C64",
}  # fmt: skip


def torch_stored_form(name: str, path: str) -> StoredForm:
    form = TORCH_DTYPES.get(name)
    if form is None:
        raise UnsupportedStateError(path, f"torch dtype {name} cannot be saved (no stable byte layout)")
    return form


def numpy_stored_form(dtype: np.dtype, path: str) -> StoredForm:
    """Stored form of a numpy dtype; byte order is normalised to little-endian on disk."""
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise UnsupportedStateError(
            path, f"numpy dtype {dtype!r} holds Python objects or fields; not saveable"
        )
    code = _NUMPY_CODES.get(dtype.str[1:])
    if code is not None:
        return StoredForm(code, dtype.itemsize)
    if dtype.kind in "Mm":  # datetime64 / timedelta64: int64 ticks, unit kept in the leaf's dtype
        return StoredForm("I64", 8)
    if dtype.kind in "fcSU" and dtype.itemsize > 0:  # long double, complex128+, fixed-width strings
        return StoredForm("U8", dtype.itemsize, dtype.itemsize)
    raise UnsupportedStateError(path, f"numpy dtype {dtype.str!r} has no safe stored form")


def parse_numpy_dtype(text: str) -> np.dtype:
    """A numpy dtype from a manifest string, accepting only plain scalar dtypes (no objects)."""
    if not isinstance(text, str) or len(text) > 32 or not text or text[0] not in "<>|=":
        raise ValueError(f"not a numpy dtype string: {text!r}")
    try:
        dtype = np.dtype(text)
    except Exception as exc:  # numpy hands comma strings to ast.literal_eval: SyntaxError, among others
        raise ValueError(f"not a numpy dtype string: {text!r}") from exc
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biufcMmSU":
        raise ValueError(f"numpy dtype {text!r} is not allowed")
    return dtype
