"""The vision encoder, run as a traced graph for image grids the server has seen before.

Why: the vision encoder runs on request threads while the engine's thread decodes (see
`predictor.engine.scheduler`). Run eagerly, it is hundreds of small tensor operations, and PyTorch
releases and re-takes the GIL around each of them; every re-take while the decoding thread
runs costs that thread time too. On this project's CPU benchmark, an eager encoder on request
threads cut the throughput of 16 concurrent clients by a quarter; the same encoder as a
TorchScript graph, which runs all its operations with the GIL released, cost nothing
measurable, and is itself 8-35% faster (by family).

A traced graph is only valid for the image grid it was traced with: the encoder computes
positions, window and attention boundaries from `image_grid_thw` in Python, and tracing records
them as constants. So graphs are kept per grid, in a small LRU, and a grid is traced the
second time it is seen (a folder of photos from one camera repeats one grid; a one-off size
does not pay for a trace), on a tracing thread of its own so that no request waits for it.
Before a graph is used it must reproduce the eager output exactly;
if tracing fails or the outputs differ, that grid stays eager. `--trace_vision false` turns
it off.

Memory: a graph must be freed when it leaves the LRU. `torch.jit.trace` cannot give that: it
registers every traced module's types and methods, with the grid-derived constants their graphs
hold (about 7.6 MB for a 448x448 grid), in TorchScript's process-wide compilation unit, where
they stay after the module is dropped; a server cycling through more grids than the LRU holds
grew without bound. So the encoder is traced to a bare graph
(`torch._C._create_graph_by_tracing`, what `torch.jit.trace` itself calls) whose inputs are the
two call arguments plus the model's weights, and the graph becomes a function in a compilation
unit of its own (`torch._C._create_function_from_graph`), which is freed with the function.
Weights the graph does not read are pruned from its inputs, and the Python stack the tracer
records for every node (most of a graph's memory) is dropped. That also makes a trace about
three times cheaper than `torch.jit.trace`, which built a script type for every submodule.
Graphs are built on one tracing thread and freed memory is handed back to the system when one
is dropped; `hack/soak.py` cycles more grids than the LRU holds and checks that memory levels
off.

TorchScript is in maintenance in PyTorch (`torch.jit.trace` warns that it is deprecated in
favour of `torch.compile` and `torch.export`). Neither of those runs a whole graph without
the GIL on a CPU without minutes of compilation per shape, so this module keeps tracing, with
the eager path as its fallback (also where a PyTorch release lacks the tracing calls above).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import queue
import threading
import warnings
from collections import Counter, OrderedDict
from typing import Any

import torch
from torch.jit._trace import _create_interpreter_name_lookup_fn, _unique_state_dict
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

logger = logging.getLogger(__name__)
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))

TRACE_AFTER = 2  # a grid is traced when it is seen for the second time
MAX_GRAPHS = 16  # traced grids kept (least recently used dropped)
TRACE_BACKLOG = 8  # grids waiting for the tracing thread; more are traced on a later sighting
MAX_REMEMBERED = 4096  # grids counted or refused before those records start over

# Tracing records grid-derived values as constants on purpose, and says so; so does the
# deprecation notice above. Both would otherwise be logged at every trace.
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
warnings.filterwarnings(
    "ignore", message=r".*torch\.jit\.trace.* is deprecated", category=FutureWarning
)
# Tracing reads every module attribute, transformers' deprecated ones included.
warnings.filterwarnings(
    "ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning
)


class VisionEncoder:
    """`model.get_image_features` without the encoder's unmerged last hidden state, traced
    per image grid when `trace` is on. Safe to call from many threads."""

    def __init__(self, model: Any, trace: bool = True, trace_after: int = TRACE_AFTER):
        self.model = model
        self.trace = trace
        self.trace_after = trace_after
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._seen: Counter[tuple] = Counter()
        self._eager_only: set[tuple] = set()
        self._lock = threading.Lock()
        # Due grids wait here for the one tracing thread (see `_trace_in_background`).
        self._backlog: queue.Queue[tuple] = queue.Queue(maxsize=TRACE_BACKLOG)
        self._queued: set[tuple] = set()
        self._tracer: threading.Thread | None = None

    @property
    def traced_grids(self) -> list[tuple]:
        with self._lock:
            return list(self._graphs)

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> Any:
        if not self.trace:
            return self.eager(pixel_values, image_grid_thw)
        key = (
            tuple(image_grid_thw.flatten().tolist()),
            pixel_values.dtype,
            str(pixel_values.device),
        )
        graph = self._graph(key)
        if graph is not None:
            return graph(pixel_values, image_grid_thw)
        output = self.eager(pixel_values, image_grid_thw)
        self._queue_trace(key, pixel_values, image_grid_thw, output)
        return output

    def wait_for_traces(self) -> None:
        """Block until every grid queued for tracing has been traced (or left eager)."""
        self._backlog.join()

    def _queue_trace(
        self, key: tuple, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, output: Any
    ) -> None:
        """Hand a grid that is due to the tracing thread; the caller never waits for a trace.

        Why one thread: a trace is the eager pass again plus graph building, which a request
        should not pay for; and the graphs' many small allocations then come from one malloc
        arena instead of one per request thread, which kept memory from levelling off while
        the cache turned over."""
        with self._lock:
            if key in self._queued or not self._due_locked(key):
                return
            if self._tracer is None:
                self._tracer = threading.Thread(
                    target=self._trace_in_background, name="vision-tracer", daemon=True
                )
                self._tracer.start()
            try:
                self._backlog.put_nowait((key, pixel_values, image_grid_thw, output))
            except queue.Full:
                return  # busy tracing: this grid gets another chance at its next sighting
            self._queued.add(key)

    @torch.inference_mode()
    def _trace_in_background(self) -> None:
        while True:
            key, pixel_values, image_grid_thw, output = self._backlog.get()
            try:
                self._trace(key, pixel_values, image_grid_thw, output)
            finally:
                with self._lock:
                    self._queued.discard(key)
                self._backlog.task_done()

    def eager(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> Any:
        output = self.model.get_image_features(
            pixel_values=pixel_values, image_grid_thw=image_grid_thw, return_dict=True
        )
        # Keep what the language model consumes (per-image embeddings, and Qwen3-VL's
        # deepstack features); the encoder's unmerged last hidden state is 4x larger.
        return type(output)(**{k: v for k, v in output.items() if k != "last_hidden_state"})

    def _graph(self, key: tuple) -> _Graph | None:
        with self._lock:
            graph = self._graphs.get(key)
            if graph is not None:
                self._graphs.move_to_end(key)
                return graph
            if len(self._seen) >= MAX_REMEMBERED:
                self._seen.clear()  # many one-off grids: forget them rather than grow
            self._seen[key] += 1
            return None

    def _due_locked(self, key: tuple) -> bool:
        return (
            key not in self._graphs
            and key not in self._eager_only
            and self._seen[key] >= self.trace_after
        )

    def _trace(
        self, key: tuple, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, expected: Any
    ) -> None:
        try:
            graph = _Graph.trace(self, pixel_values, image_grid_thw)
            same = _equal(graph(pixel_values, image_grid_thw), expected)
        except Exception as exc:  # tracing is an optimisation: any failure keeps eager
            logger.warning("vision encoder stays eager for grid %s: %s", key[0], exc)
            same, graph = False, None
        with self._lock:
            if graph is None or not same:
                if graph is not None:
                    logger.warning(
                        "vision encoder stays eager for grid %s: traced output differs from eager",
                        key[0],
                    )
                if len(self._eager_only) >= MAX_REMEMBERED:
                    self._eager_only.clear()
                self._eager_only.add(key)
                return
            self._graphs[key] = graph
            self._seen.pop(key, None)
            evicted = len(self._graphs) > MAX_GRAPHS
            while len(self._graphs) > MAX_GRAPHS:
                self._graphs.popitem(last=False)
        if evicted:
            _return_freed_memory()
        logger.info("vision encoder traced for grid %s", key[0])


class _Graph:
    """One traced encoder for one grid: a TorchScript function in a compilation unit of its
    own (freed with this object), fed the weights it reads, rebuilding the eager output."""

    def __init__(self, function: Any, weights: list[torch.Tensor], spec: TreeSpec):
        self.function = function
        self.weights = weights
        self.spec = spec

    @classmethod
    def trace(
        cls, encoder: VisionEncoder, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
    ) -> _Graph:
        # The weights enter as inputs (as `torch.jit.trace` passes a module's state), so the
        # graph refers to the model's tensors instead of holding them as constants.
        weights = list(_unique_state_dict(encoder.model, keep_vars=True).values())
        specs: list[TreeSpec] = []

        def flat(pixels: torch.Tensor, grid: torch.Tensor, *_weights: torch.Tensor) -> tuple:
            leaves, spec = tree_flatten(encoder.eager(pixels, grid))
            specs.append(spec)
            return tuple(leaves)

        graph, _ = torch._C._create_graph_by_tracing(
            flat,
            [pixel_values, image_grid_thw, *weights],
            _create_interpreter_name_lookup_fn(),
            False,  # strict: the output is a tuple of tensors
            False,  # force_outplace
        )
        used = _prune_unused_weights(graph, len(weights))
        _drop_source_locations(graph)
        function = torch._C._create_function_from_graph("vision_encoder", graph)
        return cls(function, [weights[i] for i in used], specs[0])

    def __call__(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> Any:
        # Unoptimised: the graph runs as traced. The profiling executor's specialised plans
        # cost memory per graph and ran no faster here (there is nothing to fuse on a CPU).
        with torch.jit.optimized_execution(False):
            output = self.function(pixel_values, image_grid_thw, *self.weights)
        leaves = list(output) if isinstance(output, tuple) else [output]
        return tree_unflatten(leaves, self.spec)


def _return_freed_memory() -> None:
    """Give memory freed by a dropped graph back to the system (glibc's `malloc_trim`, over
    every arena), so that resident memory follows the cache instead of its high-water mark.
    A no-op where the C library has no such call."""
    with contextlib.suppress(AttributeError):
        _LIBC.malloc_trim(0)


def _drop_source_locations(graph: torch._C.Graph) -> None:
    """Forget where in Python each node was recorded.

    The tracer gives every node the text of the whole Python stack that created it; over a
    vision encoder's thousands of nodes that is most of a graph's memory (about 3 MB of the
    tiny test model's 4.5), and no one reads it: errors from a graph fall back to eager."""
    bare = graph.create("prim::Constant")  # a node with no source location
    for node in _all_nodes(graph.block()):
        node.copyMetadata(bare)
    bare.destroy()


def _all_nodes(block: Any) -> list[Any]:
    nodes = []
    for node in block.nodes():
        nodes.append(node)
        for inner in node.blocks():
            nodes.extend(_all_nodes(inner))
    return nodes


def _prune_unused_weights(graph: torch._C.Graph, weight_count: int) -> list[int]:
    """Erase the graph's weight inputs it never reads; the indexes of those it keeps.

    The two call arguments stay whether used or not (the call passes them positionally)."""
    inputs = list(graph.inputs())
    first = len(inputs) - weight_count
    kept = []
    for position in range(len(inputs) - 1, first - 1, -1):
        if inputs[position].uses():
            kept.append(position - first)
        else:
            graph.eraseInput(position)
    return kept[::-1]


def _equal(actual: Any, expected: Any) -> bool:
    got, got_spec = tree_flatten(actual)
    want, want_spec = tree_flatten(expected)
    return got_spec == want_spec and all(
        isinstance(a, torch.Tensor) and torch.equal(a, b) for a, b in zip(got, want, strict=True)
    )
