"""KServe's `--event-loop` reaches the loop the server runs on (`server.use_event_loop`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import uvloop

from predictor.server.main import use_event_loop


@pytest.fixture(autouse=True)
def default_policy() -> Iterator[None]:
    yield
    asyncio.set_event_loop_policy(None)
    asyncio.set_event_loop(None)


async def running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


@pytest.mark.parametrize("choice", ["auto", "uvloop"])
def test_auto_and_uvloop_run_the_server_on_uvloop(choice: str) -> None:
    use_event_loop(choice)
    assert asyncio.get_event_loop() is not None  # what KServe configures before asyncio.run
    assert isinstance(asyncio.run(running_loop()), uvloop.Loop)


def test_asyncio_keeps_the_default_loop() -> None:
    use_event_loop("asyncio")
    assert not isinstance(asyncio.run(running_loop()), uvloop.Loop)
