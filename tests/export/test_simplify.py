"""Export clean-ups: constant Reshape shapes where the tracer computed them from the input's own dims."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")


class _Heads(torch.nn.Module):
    """view by the input's own dims (foldable) and by another tensor's dims (must stay computed)."""

    def forward(self, x, y):
        h = x.view(x.shape[0], x.shape[1], 4, -1).transpose(1, 2)  # own dims + constants
        h = h.transpose(1, 2)
        own = h.reshape(h.shape[0], h.shape[1], -1)
        other = y.reshape(x.shape[1], x.shape[0], -1)  # dims of x, data y: not foldable
        return own * 2, other + 1


def _export(tmp_path):
    from edgerun.export.onnx import GraphSpec, export_graph

    x, y = torch.randn(2, 3, 8), torch.randn(3, 2, 8)
    spec = GraphSpec("heads", _Heads(), (x, y), ["x", "y"], ["own", "other"],
                     {"x": {0: "batch", 1: "time"}, "y": {0: "time", 1: "batch"}})
    return export_graph(spec, tmp_path / "heads.onnx")


def test_own_dims_become_a_constant_shape_and_the_rest_stays(tmp_path):
    path = _export(tmp_path)
    graph = onnx.load(str(path)).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    reshapes = [n for n in graph.node if n.op_type == "Reshape"]
    constant = sorted(inits[n.input[1]].tolist() for n in reshapes if n.input[1] in inits)
    assert constant == [[0, 0, -1], [0, 0, 4, -1]]
    computed = [n for n in reshapes if n.input[1] not in inits]
    assert len(computed) == 1  # y reshaped by x's dims keeps its Shape/Concat chain
    shapes = [n.input[0] for n in graph.node if n.op_type == "Shape"]
    assert shapes and set(shapes) == {"x"}  # only the unfoldable reshape still reads dims at run time
    assert {i.name for i in graph.input} == {"x", "y"}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b, t in ((2, 3), (5, 1), (1, 7)):  # other sizes than traced: the zeros follow the input
        x = np.random.default_rng(b).standard_normal((b, t, 8)).astype(np.float32)
        y = np.random.default_rng(t).standard_normal((t, b, 8)).astype(np.float32)
        own, other = session.run(None, {"x": x, "y": y})
        np.testing.assert_allclose(own, x.reshape(b, t, 8) * 2, rtol=1e-6)
        np.testing.assert_allclose(other, y.reshape(t, b, 8) + 1, rtol=1e-6)


def test_dead_nodes_and_their_initializers_go_but_graph_inputs_stay():
    from onnx import TensorProto, helper, numpy_helper

    from edgerun.export.simplify import drop_dead_nodes

    nodes = [helper.make_node("Add", ["x", "c"], ["y"], name="used"),
             helper.make_node("Mul", ["x", "d"], ["unused"], name="dead"),
             helper.make_node("Neg", ["unused"], ["unused2"], name="dead2")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                     helper.make_tensor_value_info("d", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.ones(2, np.float32), n) for n in ("c", "d", "e")])
    assert drop_dead_nodes(graph) == 2
    assert [n.name for n in graph.node] == ["used"]
    assert sorted(i.name for i in graph.initializer) == ["c", "d"]  # d is also an input; e read by nothing


def test_plain_gemms_become_matmul_plus_add_and_a_transposed_one_stays():
    from onnx import TensorProto, helper, numpy_helper

    from edgerun.export.simplify import gemm_as_matmul

    rng = np.random.default_rng(0)
    w, b, e = (rng.standard_normal(s).astype(np.float32) for s in ((8, 6), (6,), (5, 6)))
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="conv1d"),
             helper.make_node("Gemm", ["h", "e"], ["y"], name="tied_head", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (b, "b"), (e, "e"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((3, 8)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert gemm_as_matmul(model.graph) == 1
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add", "Gemm"]
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


class _Conv1D(torch.nn.Module):
    """GPT-2's Conv1D (addmm over the input flattened to 2-D, viewed back), and a product whose
    result is viewed into other dims than its input's, which must keep its Reshapes."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(8, 6, generator=g))
        self.b = torch.nn.Parameter(torch.randn(6, generator=g))
        self.w2 = torch.nn.Parameter(torch.randn(8, 6, generator=g))

    def forward(self, x):
        out = x.size()[:-1] + (6,)
        y = torch.addmm(self.b, x.view(-1, x.size(-1)), self.w).view(out)
        z = torch.addmm(self.b, x.view(-1, x.size(-1)), self.w2).view(x.size(1), x.size(0), 6)
        return y * 2, z


def test_conv1d_products_read_the_3d_input_and_other_views_stay(tmp_path):
    from edgerun.export.onnx import GraphSpec, export_graph

    x = torch.randn(2, 3, 8)
    spec = GraphSpec("conv1d", _Conv1D(), (x,), ["x"], ["y", "z"], {"x": {0: "batch", 1: "time"}})
    path = export_graph(spec, tmp_path / "conv1d.onnx")
    graph = onnx.load(str(path)).graph
    made = {o: n for n in graph.node for o in n.output}
    products = [n for n in graph.node if n.op_type == "MatMul"]
    assert len(products) == 2
    inputs = sorted(made[n.input[0]].op_type if n.input[0] in made else n.input[0] for n in products)
    assert inputs == ["Reshape", "x"]  # the plain Conv1D reads x itself; the transposing view kept its flatten
    assert sum(n.op_type == "Reshape" for n in graph.node) == 2
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    module = _Conv1D()
    for b, t in ((2, 3), (5, 1), (1, 7)):  # other sizes than traced
        x = torch.randn(b, t, 8)
        want = [w.detach().numpy() for w in module(x)]
        got = session.run(None, {"x": x.numpy()})
        for g, w in zip(got, want):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_unflatten_leaves_a_flatten_of_other_dims_alone():
    """x (b, t, 8) viewed as (-1, 4) is not the per-row flatten MatMul could skip."""
    from onnx import TensorProto, helper, numpy_helper

    from edgerun.export.simplify import unflatten_matmuls

    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["x2"]), helper.make_node("MatMul", ["x2", "w"], ["p"]),
             helper.make_node("Reshape", ["p", "back"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array([-1, 4], np.int64), "flat"),
                               numpy_helper.from_array(np.array([0, 0, 6], np.int64), "back"),
                               numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert unflatten_matmuls(model) == 0
    assert [n.op_type for n in model.graph.node] == ["Reshape", "MatMul", "Reshape"]


def _fused_twin(path, tmp_path):
    """The graph at `path` with its self-attentions fused, saved beside it in tmp_path."""
    from edgerun.export.simplify import fuse_attention

    model = onnx.load(str(path))
    fused = fuse_attention(model)
    out = tmp_path / f"fused-{path.name}"
    onnx.save_model(model, str(out))
    return fused, model, out


@pytest.mark.parametrize("bundle", ["blip_bundle", "multi_bundle"])
def test_self_attention_fuses_into_one_op_with_the_same_output(bundle, request, tmp_path):
    """BLIP's packed QKV projection (split in three) and the built-in ViT's separate projections;
    the decoders' cached and cross attentions are not this pattern and stay."""
    from edgerun.runtime.onnxrt import session_options

    folder = request.getfixturevalue(bundle)
    vision = folder / "vision.onnx"
    layers = sum(n.op_type == "Softmax" for n in onnx.load(str(vision)).graph.node)
    fused, model, path = _fused_twin(vision, tmp_path)
    ops = [n.op_type for n in model.graph.node]
    assert fused == layers == ops.count("MultiHeadAttention") > 0
    assert "Softmax" not in ops and any(o.domain == "com.microsoft" for o in model.opset_import)
    heads = {a.i for n in model.graph.node if n.op_type == "MultiHeadAttention" for a in n.attribute if a.name == "num_heads"}
    assert len(heads) == 1 and heads.pop() > 1
    shape = [d.dim_value for d in onnx.load(str(vision)).graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal([2] + shape[1:]).astype(np.float32)
    run = [ort.InferenceSession(str(p), session_options(1), providers=["CPUExecutionProvider"]) for p in (vision, path)]
    want, got = (s.run(None, {s.get_inputs()[0].name: x})[0] for s in run)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert _fused_twin(folder / "decoder.onnx", tmp_path)[0] == 0  # cached self- and cross-attention stay


def test_the_tied_head_reads_the_one_table_through_a_reshape(blip_bundle, tmp_path):
    """Exported: the LM head's weight is the embedding table behind a run-time Reshape (onnxruntime
    would prepack a second copy of a constant weight); tied_head_weight undoes it; same logits."""
    from edgerun.export.simplify import tied_head_weight
    from edgerun.runtime.onnxrt import session_options

    path = blip_bundle / "decoder.onnx"
    model = onnx.load(str(path))
    graph = model.graph
    tables = {n.input[0] for n in graph.node if n.op_type == "Gather"} & {i.name for i in graph.initializer}
    head = next(n for n in graph.node if n.op_type == "Gemm" and n.output[0] == "logits")
    assert head.input[1] not in tables  # read through the Reshape, not as a constant weight
    reshape = next(n for n in graph.node if head.input[1] in n.output)
    assert reshape.op_type == "Reshape" and reshape.input[0] in tables
    assert tied_head_weight(graph) == 1 and head.input[1] == reshape.input[0]
    assert not any(n.op_type == "Reshape" and n.input[0] in tables for n in graph.node)
    undone = tmp_path / "undone.onnx"
    onnx.save_model(model, str(undone))
    rng = np.random.default_rng(0)
    run = [ort.InferenceSession(str(p), session_options(1), providers=["CPUExecutionProvider"]) for p in (path, undone)]
    feeds = {}
    for i in run[0].get_inputs():
        shape = [{"rows": 2, "new": 1, "past": 3, "batch": 1}.get(d, d) for d in i.shape]
        feeds[i.name] = rng.integers(1, 50, shape) if i.type == "tensor(int64)" else rng.standard_normal(shape).astype(np.float32)
    want, got = (s.run(["logits"], feeds)[0] for s in run)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _tied_model(tmp_path, external: bool):
    """Gather from an embedding table, a tied head over it (as exported: through the Reshape)."""
    from onnx import TensorProto, helper, numpy_helper

    from edgerun.export.simplify import share_tied_head

    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 8)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="embed"),
             helper.make_node("Gemm", ["h", "table"], ["logits"], name="head", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert share_tied_head(model.graph) == 1
    path = tmp_path / ("external.onnx" if external else "embedded.onnx")
    onnx.save_model(model, str(path), save_as_external_data=external, location=path.name + ".data",
                    size_threshold=256)  # the table (1,600 bytes), not the Reshape's shape constants
    return path


def test_the_tied_head_is_prepacked_from_the_same_bytes_on_disk(tmp_path):
    """prepack_tied_head: the head reads a constant of its own naming the table's very bytes in the
    data file (nothing more on disk), no Reshape; the same logits. A table inside the .onnx file
    stays behind the Reshape (aliasing it would write its bytes twice)."""
    from edgerun.export.simplify import PREPACKED_HEAD, prepack_tied_head

    path = _tied_model(tmp_path, external=True)
    model = onnx.load(str(path), load_external_data=False)
    assert prepack_tied_head(model.graph) == 1
    inits = {i.name: i for i in model.graph.initializer}
    head = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert head.input[1] == "table" + PREPACKED_HEAD
    assert list(inits[head.input[1]].external_data) == list(inits["table"].external_data)
    assert list(inits[head.input[1]].dims) == [50, 8] and not any(n.op_type == "Reshape" for n in model.graph.node)
    prepacked = tmp_path / "prepacked.onnx"
    onnx.save_model(model, str(prepacked))
    size = (tmp_path / "external.onnx.data").stat().st_size
    ids = np.array([3, 0, 49])
    want, got = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
                 for p in (path, prepacked))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert (tmp_path / "external.onnx.data").stat().st_size == size and len(list(tmp_path.glob("*.data"))) == 1

    embedded = onnx.load(str(_tied_model(tmp_path, external=False)))
    assert prepack_tied_head(embedded.graph) == 0
    assert any(n.op_type == "Reshape" for n in embedded.graph.node)
