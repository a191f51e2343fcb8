"""The engine's load, shared by the engine core and every front process (`--workers`).

Why shared memory and not messages: admission is decided in the front, at once, from what the
engine holds (`predictor.engine.client`). With one front the core used to send its load over
the pipe whenever it changed (three or four messages a request, each a wake-up of the front's
reader thread); with several fronts each would also need to know what the others admitted,
or each would fill the engine's free slots on its own. Here one small shared region holds the
core's figures (running rows and requests, waiting requests), each front's admitted requests
the core has not finished, and the drain's flag; a process-shared lock makes one front's
check-and-take atomic against the others', so the fronts together never admit more than the
queue and the free slots hold.

Writers: the core writes its three figures (one writer; aligned 8-byte stores), each front its
own slot and, for front 0, the draining flag; every admission reads all of them under the lock.
"""

from __future__ import annotations

from typing import Any

import torch

RUNNING_ROWS, RUNNING_REQUESTS, WAITING_REQUESTS, DRAINING = range(4)
_FRONTS = 4  # where the fronts' slots start


class LoadBoard:
    """The shared figures. Made by front 0 (`create`), which passes `buffer` and `lock` to
    the core and the other fronts at spawn (`attach`)."""

    def __init__(self, buffer: torch.Tensor, lock: Any, fronts: int):
        self.buffer = buffer
        self.lock = lock
        self.fronts = fronts
        self._values = buffer.numpy()  # a view of the shared pages: cheap scalar access

    @classmethod
    def create(cls, fronts: int, context: Any) -> LoadBoard:
        buffer = torch.zeros(_FRONTS + fronts, dtype=torch.int64)
        buffer.share_memory_()
        return cls(buffer, context.Lock(), fronts)

    @classmethod
    def attach(cls, handle: tuple[torch.Tensor, Any, int]) -> LoadBoard:
        return cls(*handle)

    @property
    def handle(self) -> tuple[torch.Tensor, Any, int]:
        """What another process needs to attach (picklable at spawn)."""
        return self.buffer, self.lock, self.fronts

    # ---- the core's side --------------------------------------------------------------

    def report(self, running_rows: int, waiting: int, running: int) -> None:
        values = self._values
        values[RUNNING_ROWS] = running_rows
        values[RUNNING_REQUESTS] = running
        values[WAITING_REQUESTS] = waiting

    # ---- the fronts' side -------------------------------------------------------------

    @property
    def running_rows(self) -> int:
        return int(self._values[RUNNING_ROWS])

    @property
    def running_requests(self) -> int:
        return int(self._values[RUNNING_REQUESTS])

    @property
    def waiting_requests(self) -> int:
        return int(self._values[WAITING_REQUESTS])

    @property
    def draining(self) -> bool:
        return bool(self._values[DRAINING])

    def set_draining(self) -> None:
        self._values[DRAINING] = 1

    def set_outstanding(self, front: int, requests: int) -> None:
        """Front `front`'s admitted requests that the core has not finished (decoding their
        images, sent, queued or running)."""
        self._values[_FRONTS + front] = requests

    def outstanding(self) -> int:
        """All fronts' admitted, unfinished requests."""
        return int(self._values[_FRONTS:].sum())
