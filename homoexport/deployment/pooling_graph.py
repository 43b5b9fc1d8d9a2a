"""Put the sentence-embedding pooling inside an exported encoder's ONNX graph.

Exported encoders output token states (``last_hidden_state``); a sentence-embedding user needs the pooled
(and often L2-normalised) vector, and runtimes without Python cannot run sentence-transformers' pooling.
This appends the declared pooling (mean over non-padding tokens, CLS, or max) and, when declared, L2
normalisation as a second output, ``sentence_embedding`` [batch, hidden], leaving ``last_hidden_state``
as it was. Standard ONNX operators only (opset 13 or newer), so every runtime can execute it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from homoexport.errors import UsageError
from homoexport.evaluation.sts import Pooling

OUTPUT = "sentence_embedding"


def add_pooling(onnx_path: str | Path, pooling: Pooling) -> None:
    """Append ``pooling`` to the graph in ``onnx_path`` (rewritten in place) as the output ``sentence_embedding``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = Path(onnx_path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise UsageError(f"{path.name}: opset {opset} is older than 13, which the pooling nodes need")
    outputs = [o.name for o in graph.output]
    inputs = [i.name for i in graph.input]
    if "last_hidden_state" not in outputs or "attention_mask" not in inputs:
        raise UsageError(f"{path.name} has no last_hidden_state output or no attention_mask input: export it as feature-extraction")
    if OUTPUT in outputs:
        return

    def const(name: str, value) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), f"pool_{name}"))
        return f"pool_{name}"

    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["pool_mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["pool_mask", const("axis2", np.array([2], dtype=np.int64))], ["pool_mask3"]),
    ]
    axis1 = const("axis1", np.array([1], dtype=np.int64))
    pooled = "pool_out"
    if pooling.mode == "mean":
        nodes += [
            helper.make_node("Mul", ["last_hidden_state", "pool_mask3"], ["pool_masked"]),
            helper.make_node("ReduceSum", ["pool_masked", axis1], ["pool_sum"], keepdims=0),
            helper.make_node("ReduceSum", ["pool_mask3", axis1], ["pool_count"], keepdims=0),
            helper.make_node("Max", ["pool_count", const("eps", np.array(1e-9, dtype=np.float32))], ["pool_count_safe"]),
            helper.make_node("Div", ["pool_sum", "pool_count_safe"], [pooled]),
        ]
    elif pooling.mode == "cls":
        nodes.append(helper.make_node("Gather", ["last_hidden_state", const("first", np.array(0, dtype=np.int64))], [pooled], axis=1))
    else:  # max over real tokens: padding is pushed far below any state first
        nodes += [
            helper.make_node("Sub", ["pool_mask3", const("one", np.array(1.0, dtype=np.float32))], ["pool_off"]),
            helper.make_node("Mul", ["pool_off", const("big", np.array(1e9, dtype=np.float32))], ["pool_penalty"]),
            helper.make_node("Add", ["last_hidden_state", "pool_penalty"], ["pool_shifted"]),
            helper.make_node("ReduceMax", ["pool_shifted", axis1] if opset >= 18 else ["pool_shifted"], [pooled], keepdims=0,
                             **({} if opset >= 18 else {"axes": [1]})),
        ]
    if pooling.normalize:
        nodes.append(helper.make_node("LpNormalization", [pooled], [OUTPUT], axis=1, p=2))
    else:
        nodes.append(helper.make_node("Identity", [pooled], [OUTPUT]))
    graph.node.extend(nodes)
    hidden = next(o for o in graph.output if o.name == "last_hidden_state").type.tensor_type.shape.dim
    batch_dim = hidden[0].dim_param or hidden[0].dim_value
    width_dim = hidden[2].dim_param or hidden[2].dim_value
    graph.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [batch_dim, width_dim]))
    onnx.checker.check_model(model)
    tmp = path.with_name(f".{path.name}.pooling.tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)
