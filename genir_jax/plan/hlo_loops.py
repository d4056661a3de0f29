"""How much XLA's cost analysis undercounts a program with loops: its work with and without trip counts.

XLA's `cost_analysis()` counts the body of a `while` loop once, whatever its trip count, so a T5 whose layers
run under `nn.scan` reports the FLOPs of one layer per stack (a 4-layer and an 8-layer model report the
same). The compiled HLO text names each loop's ``known_trip_count``; this module walks the call graph from
the entry computation and counts every computation as often as it runs (a loop body `n` times per run of
its caller) and as XLA's analysis does (once):

- `flops_scale`: dot FLOPs with trip counts over dot FLOPs counted once (dots inside fusions included);
- `bytes_scale`: the same ratio for bytes moved, estimated as the operand and result bytes of every
  instruction outside fusions (a fusion's inside stays in registers and caches, as XLA counts it; a
  dynamic slice or in-place update of a buffer counts the slice, not the buffer).

`genir_jax.plan.planning` multiplies XLA's FLOPs and bytes accessed by them. Checked against the same programs
with their layers unrolled (4 and 8 layers per stack): forward FLOPs and bytes within 0.5%; a training
step's FLOPs 13-27% and bytes 36-38% above the unrolled program's (the scanned form really stacks per-layer
residuals and gradients; XLA's once-counted total also holds elementwise work the dot ratio scales).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\][^ ]*\s+([\w\-]+)\((.*)$")
_PARAMETER = re.compile(r"([\w.\-]+):\s*(\w+)\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_OPERANDS = re.compile(r"%([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
# instructions that move no data of their own
_FREE = frozenset({"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "after-all", "partition-id",
                   "replica-id", "iota"})


@dataclasses.dataclass
class _Computation:
    flops: float = 0.0  # dots of this computation itself
    bytes: float = 0.0  # operand + result bytes of its non-free instructions
    calls: list = dataclasses.field(default_factory=list)  # (callee, runs per call, moves bytes)
    parameters: list = dataclasses.field(default_factory=list)  # parameter names in order
    # a fused computation's parameters that it only slices or updates in place, with the bytes it touches,
    # and the bytes its result really writes when that is an in-place update
    sliced: dict = dataclasses.field(default_factory=dict)
    result_bytes: float | None = None


def _bytes(shape) -> float:
    dtype, dims = shape
    return float(_ITEM_BYTES.get(dtype, 4) * math.prod(dims))


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d)


def _parse(hlo_text: str) -> tuple[dict[str, _Computation], str | None]:
    """Every computation's own dot FLOPs, bytes and calls, and the entry computation's name."""
    computations: dict[str, _Computation] = {}
    entry, name, current, shapes = None, None, None, {}
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and not line.startswith(" "):
            name, current, shapes = header.group(1), _Computation(), {}
            if line.startswith("ENTRY"):
                entry = name
            for parameter, dtype, dims in _PARAMETER.findall(header.group(2)):
                shapes[parameter] = (dtype, _dims(dims))
                current.parameters.append(parameter)
            continue
        if name is None:
            continue
        if line.strip() == "}":
            computations[name] = current
            name = None
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction:
            result, dtype, dims, opcode, rest = instruction.groups()
            shapes[result] = (dtype, _dims(dims))
            operands = _OPERANDS.findall(rest.split(")", 1)[0])
            if opcode == "dot" and operands:
                lhs = shapes.get(operands[0], ("", ()))[1]
                contracting = _CONTRACTING.search(rest)
                size = math.prod(lhs[i] for i in _dims(contracting.group(1)) if i < len(lhs)) if contracting else 1
                current.flops += 2.0 * math.prod(shapes[result][1]) * size
            if opcode in ("dynamic-update-slice", "dynamic-slice") and operands:
                # in place: only the slice is read or written, not the whole buffer
                touched = _bytes(shapes[operands[1]]) if opcode == "dynamic-update-slice" and len(operands) > 1 \
                    and operands[1] in shapes else _bytes(shapes[result])
                if operands[0] in current.parameters:
                    current.sliced[operands[0]] = touched
                if opcode == "dynamic-update-slice" and line.lstrip().startswith("ROOT"):
                    current.result_bytes = touched
                current.bytes += 2 * touched
            elif opcode == "fusion":
                fused = _CALLEE.search(line)
                callee = computations.get(fused.group(2)) if fused else None
                current.bytes += _fusion_bytes(callee, shapes[result], operands, shapes)
            elif opcode not in _FREE:
                current.bytes += sum(_bytes(shape) for shape in [shapes[result]] + [shapes[o] for o in operands
                                                                                      if o in shapes])
        trips = 1
        if " while(" in line:
            match = _TRIP_COUNT.search(line)
            trips = int(match.group(1)) if match else 1
        for kind, callee in _CALLEE.findall(line):
            # a fusion's inside and a reduction's scalar function move no memory of their own
            moves_bytes = kind not in ("calls", "to_apply") or " call(" in line
            current.calls.append((callee, trips if kind in ("body", "condition") else 1, moves_bytes))
        for group in _BRANCHES.findall(line):
            current.calls.extend((callee.strip().lstrip("%"), 1, True) for callee in group.split(",")
                                 if callee.strip())
    return computations, entry


def _fusion_bytes(fused: _Computation | None, result, operands, shapes) -> float:
    """A fusion's operand and result bytes, counting only the slices of buffers it updates or reads in place."""
    sliced = {} if fused is None else {i: fused.sliced[name] for i, name in enumerate(fused.parameters)
                                       if name in fused.sliced}
    total = fused.result_bytes if fused is not None and fused.result_bytes is not None else _bytes(result)
    for index, operand in enumerate(operands):
        if operand in shapes:
            total += sliced.get(index, _bytes(shapes[operand]))
    return total


def _total(parsed, quantity: str, with_trip_counts: bool) -> float:
    computations, entry = parsed
    if entry is None:
        return 0.0

    @functools.lru_cache(maxsize=None)
    def total(name: str) -> float:
        computation = computations.get(name)
        if computation is None:
            return 0.0
        own = getattr(computation, quantity)
        return own + sum((runs if with_trip_counts else 1) * total(callee)
                         for callee, runs, moves_bytes in computation.calls if quantity == "flops" or moves_bytes)

    return total(entry)


def dot_flops(hlo_text: str, with_trip_counts: bool = True) -> float:
    """Dot FLOPs of a compiled HLO module, loop bodies counted by their trip counts (or once)."""
    return _total(_parse(hlo_text), "flops", with_trip_counts)


def bytes_moved(hlo_text: str, with_trip_counts: bool = True) -> float:
    """Estimated bytes read and written (instructions outside fusions), loops by trip count (or once)."""
    return _total(_parse(hlo_text), "bytes", with_trip_counts)


def _ratio(parsed, quantity: str) -> float:
    once = _total(parsed, quantity, with_trip_counts=False)
    return _total(parsed, quantity, with_trip_counts=True) / once if once > 0 else 1.0


def flops_scale(hlo_text: str) -> float:
    """Dot FLOPs with trip counts over dot FLOPs counted once (1.0 without loops or without dots)."""
    return _ratio(_parse(hlo_text), "flops")


def bytes_scale(hlo_text: str) -> float:
    """Estimated bytes with trip counts over bytes counted once (1.0 without loops)."""
    return _ratio(_parse(hlo_text), "bytes")


def scales(hlo_text: str) -> tuple[float, float]:
    """(`flops_scale`, `bytes_scale`) from one parse of the module."""
    parsed = _parse(hlo_text)
    return _ratio(parsed, "flops"), _ratio(parsed, "bytes")
