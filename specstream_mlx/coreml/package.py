"""Read a saved ``.mlpackage`` back (spec only: works on Linux) and check it.

``read`` summarises what a Swift caller would see: inputs with their data
types, shapes and enumerated shapes, outputs, states, the ``specstream.*``
metadata, the program's operation counts and the weight file's size.
``check`` compares that summary with what the exporter meant to write.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Dict, List

from . import CoreMLExportError, interface, require_coremltools

#: Operations that hold quantised weights (iOS 18 block-wise, and the older affine form).
QUANTIZED_OPS = ("constexpr_blockwise_shift_scale", "constexpr_affine_dequantize")


def _array(array_type) -> dict:
    from coremltools.proto import FeatureTypes_pb2 as ft

    dtype = ft.ArrayFeatureType.ArrayDataType.Name(array_type.dataType).lower()
    enumerated = [tuple(s.shape) for s in array_type.enumeratedShapes.shapes]
    return {"dtype": dtype, "shape": tuple(array_type.shape), "enumerated": enumerated}


def _count_ops(block, counts: Counter) -> None:
    for op in block.operations:
        counts[op.type] += 1
        for inner in op.blocks:
            _count_ops(inner, counts)


def read(path) -> dict:
    """Summary of a saved package (see the module docstring).

    Raises:
        CoreMLExportError: not a readable ``.mlpackage``.
    """
    ct = require_coremltools()
    path = Path(path)
    try:
        spec = ct.utils.load_spec(str(path))
    except Exception as exc:  # coremltools raises several types for unreadable packages
        raise CoreMLExportError(f"{path} is not a readable Core ML package ({exc})") from None
    desc = spec.description
    ops: Counter = Counter()
    functions = spec.mlProgram.functions
    for function in functions.values():
        for block in function.block_specializations.values():
            _count_ops(block, ops)
    weights = path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    return {
        "inputs": {f.name: _array(f.type.multiArrayType) for f in desc.input},
        "outputs": {f.name: _array(f.type.multiArrayType) for f in desc.output},
        "states": {f.name: _array(f.type.stateType.arrayType) for f in desc.state},
        "metadata": dict(desc.metadata.userDefined),
        "opsets": sorted({f.opset for f in functions.values()}),
        "ops": dict(ops),
        "weight_bytes": weights.stat().st_size if weights.is_file() else 0,
        "spec_version": spec.specificationVersion,
    }


def _expected_inputs(layout, cache_slots: int) -> Dict[str, tuple]:
    """``name -> (dtype, enumerated shapes)`` of every input."""
    sizes, k = layout.tree_sizes, layout.commit_slots
    rows = [(1, t) for t in sizes]
    return {
        interface.input_name("input_ids"): ("int32", rows),
        interface.input_name("position_ids"): ("int32", rows),
        interface.input_name("attention_mask"): ("float16", [(1, 1, t, cache_slots) for t in sizes]),
        interface.input_name("write_start"): ("int32", [(1,)]),
        interface.input_name("commit_src"): ("int32", [(k,)]),
        interface.input_name("commit_dst"): ("int32", [(k,)]),
    }


def check(path, expected: dict) -> List[str]:
    """Problems of the package at ``path`` against ``expected`` (empty: none).

    Args:
        expected: ``layout`` (host ``Layout``), ``cache_shape``, ``metadata``
            (the ``specstream.*`` entries) and ``quantize`` (none | int8 | int4).
    """
    summary = read(path)
    layout = expected["layout"]
    problems = []
    want_inputs = _expected_inputs(layout, layout.max_context)
    if set(summary["inputs"]) != set(want_inputs):
        problems.append(f"inputs {sorted(summary['inputs'])}, expected {sorted(want_inputs)}")
    for name, (dtype, shapes) in want_inputs.items():
        got = summary["inputs"].get(name)
        if got is None:
            continue
        got_shapes = sorted(set(got["enumerated"]) | {got["shape"]})
        if got["dtype"] != dtype or got_shapes != sorted(shapes):
            problems.append(f"input {name}: {got['dtype']} {got_shapes}, expected {dtype} {sorted(shapes)}")
    want_outputs = {interface.output_name(r) for r in ("main_logits", "stream_logits")}
    if set(summary["outputs"]) != want_outputs:
        problems.append(f"outputs {sorted(summary['outputs'])}, expected {sorted(want_outputs)}")
    for name, out in summary["outputs"].items():
        if out["dtype"] != "float16":
            problems.append(f"output {name} is {out['dtype']}, expected float16")
    for role in ("key_cache", "value_cache"):
        state = summary["states"].get(interface.state_name(role))
        if state is None or state["shape"] != tuple(expected["cache_shape"]) or state["dtype"] != "float16":
            problems.append(f"state {role}: {state}, expected float16 {tuple(expected['cache_shape'])}")
    for key, value in expected["metadata"].items():
        if summary["metadata"].get(key) != value:
            problems.append(f"metadata {key} is {summary['metadata'].get(key)!r}, expected {value!r}")
    if summary["opsets"] != ["CoreML8"]:
        problems.append(f"program opsets {summary['opsets']}, expected CoreML8 (macOS 15 / iOS 18)")
    quantized = sum(summary["ops"].get(op, 0) for op in QUANTIZED_OPS)
    if (expected["quantize"] != "none") != (quantized > 0):
        problems.append(f"{quantized} quantized weight ops for --quantize {expected['quantize']}")
    return problems
