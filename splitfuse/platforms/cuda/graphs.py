"""CUDA graphs of the decode-only step: captured once per padded batch size, replayed step after step.

A decode step launches hundreds of small kernels (a few per layer); on a GPU their launch time, not
their work, bounds small batches. Each capture size B (``capture_sizes``: 1, 2, 4, 8, then every 16
up to the largest batch) gets one graph of the model's forward over B decode rows, recorded with
fixed buffers: token ids, positions and the slot mapping live in ``DecodeGraphs``' own device
tensors, the attention metadata in the backend's persistent buffers (``graph_safe`` backends: the
Triton one), and the block tables are planned at one fixed width (the longest request's blocks), so
every address a captured kernel reads stays the same.

A step of n <= B decodes (``run``): the inputs are copied into the buffers (one host-to-device copy
from pinned memory), rows n..B-1 are padding (token 0 at position 0, no context, slot -1: the
attention writes no KV and outputs zeros for them), the backend plans into the same buffers (checked:
a buffer that moved would leave the graph reading stale memory, so it is an error), the graph
replays, and the first n rows of its output are the hidden states. Nothing on the way synchronises
with the device; the runner reads only the sampled tokens back.

``GraphApi`` is the one place that touches ``torch.cuda`` graphs, so the logic above runs on the CPU
in tests with a fake that replays the captured callable on its captured arguments.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional

import numpy as np
import torch

from splitfuse.attention.backend import AttentionBackend, BatchLayout

MAX_CAPTURE_SIZE = 256
_SMALL_SIZES = (1, 2, 4, 8)
_SIZE_STEP = 16
PAD_SLOT = -1  # a padding row's KV slot: the graph-safe backends write nothing for it

# forward(input_ids [B], positions [B], metadata) -> hidden [B, hidden]
Forward = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def capture_sizes(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, 8, 16, 32, ... up to the first size >= max_batch (at most 256): 20 -> (1, 2, 4, 8, 16, 32)."""
    limit = min(max(1, max_batch), MAX_CAPTURE_SIZE)
    sizes = [*_SMALL_SIZES, *range(_SIZE_STEP, MAX_CAPTURE_SIZE + 1, _SIZE_STEP)]
    kept = [size for size in sizes if size < limit]
    return (*kept, next(size for size in sizes if size >= limit))


class GraphApi:
    """torch.cuda's graphs: capture a callable's kernels, replay them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()  # every size's graph shares one memory pool

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = fn()
        return graph, output

    @staticmethod
    def replay(graph: Any) -> None:
        graph.replay()

    def pinned(self, size: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(size, dtype=dtype, pin_memory=True)


@dataclasses.dataclass
class _Captured:
    graph: Any
    output: torch.Tensor
    addresses: dict[str, int]  # the metadata's tensors at capture: they must not move


def tensor_addresses(metadata: Any) -> dict[str, int]:
    """Every tensor field of a metadata dataclass (and of dataclasses in its fields), by path -> data_ptr."""
    addresses: dict[str, int] = {}

    def visit(value: Any, path: str) -> None:
        if isinstance(value, torch.Tensor):
            addresses[path] = value.data_ptr()
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for item in dataclasses.fields(value):
                visit(getattr(value, item.name), f"{path}.{item.name}" if path else item.name)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(item, f"{path}[{index}]")

    visit(metadata, "")
    return addresses


class DecodeGraphs:
    """Graphs of ``forward`` for decode-only steps of up to ``sizes[-1]`` requests (see the module docstring).

    ``max_blocks_per_request``: the block tables' fixed width (a longer request runs eagerly);
    ``num_splits``: a size's attention KV splits, fixed at its capture (the backend derives each row's
    split ranges from its context length on the device, so one value serves every length).
    """

    def __init__(self, forward: Forward, backend: AttentionBackend, sliding_windows: tuple[Optional[int], ...], *,
                 sizes: tuple[int, ...], max_blocks_per_request: int, block_size: int, device: torch.device,
                 num_splits: Callable[[int], int], api: Optional[GraphApi] = None) -> None:
        self._forward = forward
        self._backend = backend
        self._windows = sliding_windows
        self.sizes = sizes
        self.max_blocks_per_request = max_blocks_per_request
        self._block_size = block_size
        self._num_splits = num_splits
        self._api = api or GraphApi(device)
        capacity = sizes[-1]
        # Device buffers every graph reads, and pinned host staging for one copy per step.
        self._staging = self._api.pinned(3 * capacity, torch.long)
        self._inputs = torch.zeros(3 * capacity, dtype=torch.long, device=device)
        self.input_ids, self.positions, self.slot_mapping = self._inputs.view(3, capacity).unbind(0)
        self._graphs: dict[int, _Captured] = {}
        self.num_replays = 0

    def size_for(self, num_rows: int) -> Optional[int]:
        return next((size for size in self.sizes if size >= num_rows), None)

    def takes(self, layout: BatchLayout) -> bool:
        """A decode-only step that fits a captured size and the block tables' width."""
        num_reqs = len(layout.query_lens)
        return (num_reqs > 0 and layout.num_decodes == num_reqs and self.size_for(num_reqs) is not None
                and layout.block_tables.shape[1] <= self.max_blocks_per_request)

    def capture_all(self) -> float:
        """Captures every size, largest first (later ones reuse its memory pool); returns the seconds taken."""
        start = time.perf_counter()
        for size in sorted(self.sizes, reverse=True):
            self._capture(size)
        return time.perf_counter() - start

    def _capture(self, size: int) -> None:
        metadata = self._plan(self._padding_layout(size), size)
        ids, positions = self.input_ids[:size], self.positions[:size]
        self._forward(ids, positions, metadata)  # once eagerly: kernels compiled, lazy state set up
        graph, output = self._api.capture(lambda: self._forward(ids, positions, metadata))
        self._graphs[size] = _Captured(graph, output, tensor_addresses(metadata))

    def run(self, token_ids: list[int], positions: np.ndarray, layout: BatchLayout) -> torch.Tensor:
        """Hidden states [n, hidden] of a decode-only step (``takes(layout)``), by replaying its size's graph."""
        num_rows = len(token_ids)
        size = self.size_for(num_rows)
        captured = self._graphs[size]
        staged = self._staging.view(3, -1)[:, :size]
        staged[0, :num_rows] = torch.tensor(token_ids, dtype=torch.long)
        staged[1, :num_rows] = torch.from_numpy(positions[:num_rows])
        staged[2, :num_rows] = layout.slot_mapping[:num_rows].cpu()
        staged[:2, num_rows:] = 0
        staged[2, num_rows:] = PAD_SLOT
        self._inputs.copy_(self._staging, non_blocking=True)  # one copy; a graph reads its first rows only
        metadata = self._plan(self._padded(layout, size), size)
        moved = {path for path, address in tensor_addresses(metadata).items()
                 if captured.addresses.get(path) != address}
        if moved:
            raise RuntimeError(f"the attention backend's step buffers moved since the graph of {size} rows was "
                               f"captured ({', '.join(sorted(moved))}): its replay would read stale memory")
        self._api.replay(captured.graph)
        self.num_replays += 1
        return captured.output[:num_rows]

    def _plan(self, layout: BatchLayout, size: int) -> Any:
        return self._backend.plan(layout, self._windows, num_splits=self._num_splits(size))  # type: ignore[call-arg]

    def _padding_layout(self, size: int) -> BatchLayout:
        """``size`` padding rows: no context, no KV written (what capture records and a step's tail reuses)."""
        return BatchLayout(
            query_lens=np.ones(size, dtype=np.int64), context_lens=np.zeros(size, dtype=np.int64),
            query_start_loc=np.arange(size + 1, dtype=np.int64),
            block_tables=np.zeros((size, self.max_blocks_per_request), dtype=np.int64),
            slot_mapping=self.slot_mapping[:size], num_decodes=size, block_size=self._block_size)

    def _padded(self, layout: BatchLayout, size: int) -> BatchLayout:
        """The step's rows, then padding rows up to ``size``; block tables at the fixed width."""
        num_rows = len(layout.query_lens)
        padded = self._padding_layout(size)
        padded.context_lens[:num_rows] = layout.context_lens
        padded.block_tables[:num_rows, :layout.block_tables.shape[1]] = layout.block_tables
        return padded
