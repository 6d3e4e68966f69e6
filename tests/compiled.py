"""A compile check shared by tests: ``torch.compile(fullgraph=True)`` makes one graph whose ternary linears are ops."""

import torch
from torch import nn

from bitflux_cli.ternary import TernaryLinear


def compile_one_graph(model, backend, *args, **kwargs):
    """Run ``model`` compiled with ``fullgraph=True`` (a graph break raises); assert Dynamo made one
    graph whose ternary linears are all ``torch.ops.bitflux`` calls. Returns the compiled output."""
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    with torch.no_grad():
        out = torch.compile(model, fullgraph=True, backend=record)(*args, **kwargs)
    assert len(graphs) == 1
    calls = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function" and "bitflux" in str(n.target)]
    layers = [m for m in model.modules() if isinstance(m, TernaryLinear)] if isinstance(model, nn.Module) else []
    rotated = sum(m.rotation is not None for m in layers)  # each also calls bitflux.hadamard on its input
    assert len(calls) - rotated == max(1, len(layers)) and sum("hadamard" in c for c in calls) == rotated
    return out
