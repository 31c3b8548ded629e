"""The per-peer outbox: order, the bound that `put` waits on, `idle` (when a message may skip the queue)."""
import asyncio

import pytest

from meshsl.node.outbox import Outbox


@pytest.mark.asyncio
async def test_put_waits_for_room_and_order_is_kept():
    box = Outbox(limit=2)
    await box.put("a")
    box.post("b")  # posting never waits, the box is now full
    assert box.full and not box.idle
    blocked = asyncio.create_task(box.put("c"))
    await asyncio.sleep(0)
    assert not blocked.done()  # no room: the producer waits
    assert await box.get() == "a"
    box.done()
    await asyncio.wait_for(blocked, timeout=5)
    got = []
    for _ in range(2):
        got.append(await box.get())
        box.done()
    assert got == ["b", "c"]
    assert box.idle
    await asyncio.wait_for(box.join(), timeout=5)


@pytest.mark.asyncio
async def test_a_message_in_flight_keeps_the_box_busy():
    box = Outbox(limit=4)
    box.post("x")
    item = await box.get()
    assert item == "x" and not box.idle  # being sent: a later message must not overtake it
    join = asyncio.create_task(box.join())
    await asyncio.sleep(0)
    assert not join.done()
    box.done()
    await asyncio.wait_for(join, timeout=5)
    assert box.idle
