"""One vector step's K updates as a CUDA graph (--graph-ready), and the same code eagerly everywhere else.

`StepGraph(fn, ...)` wraps `fn(k)`, a function that runs k updates without a host sync and returns its outputs as
tensors (a nested list/tuple/dict). On CPU, or whenever capture is off, each call is `fn(k)`: the CPU tests run
exactly the code CUDA captures. On CUDA the first `warmup` calls run eagerly on a side stream (real updates, as
PyTorch's whole-network capture recipe asks: they allocate the optimizers' state and pick kernels); the next call with
a given k captures `fn(k)` into a `torch.cuda.CUDAGraph` and replays it at once (capturing records the kernels
without running them), and every later call with that k only replays it. Outputs are the graph's static tensors:
read them before the next call. A change of `key` (a new reward function, say) drops the graphs.

What a captured update must satisfy (checked on CPU by tests/test_graph_ready.py): no host read-backs, no tensors
built from host values, state read from tensors updated in place (learning rates, the replay's size, target
networks), and every generator it draws from registered with the graph (`generators`).

NOT YET MEASURED: no GPU was available when this was written; the capture path has never run. The first GPU call of
`python sobirl/bench.py --gpu-report` exercises it and compares it with the eager update.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch


class StepGraph:
    def __init__(
        self,
        fn: Callable[[int], Any],
        device: torch.device,
        generators: Sequence[torch.Generator] = (),
        capture: bool = True,
        warmup: int = 3,
    ):
        self.fn = fn
        self.device = device
        self.generators = list(generators)
        self.capture = capture and device.type == "cuda"
        self.warmup = warmup
        self.eager_calls = 0
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Any]] = {}
        self.key: Hashable = None
        self.replays = 0

    def __call__(self, k: int, key: Hashable = None) -> Any:
        if not self.capture:
            return self.fn(k)
        if key != self.key:
            self.graphs.clear()
            self.key = key
            self.eager_calls = 0
        if k in self.graphs:
            graph, outputs = self.graphs[k]
            graph.replay()
            self.replays += 1
            return outputs
        if self.eager_calls < self.warmup:
            self.eager_calls += 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                outputs = self.fn(k)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return outputs
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            graph.register_generator_state(generator)  # torch >= 2.5; the default CUDA generator is registered anyway
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(graph):
            outputs = self.fn(k)
        self.graphs[k] = (graph, outputs)
        graph.replay()  # the capture only recorded this call's updates: run them
        self.replays += 1
        return outputs
