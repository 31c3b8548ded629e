"""Callbacks posted from a worker thread run on the loop, in order, even when one of them fails."""
import asyncio
import threading

from meshsl.node.loop_post import poster_for


async def test_posts_from_a_thread_run_in_order_and_survive_a_failing_callback():
    loop = asyncio.get_running_loop()
    poster = poster_for(loop)
    assert poster_for(loop) is poster  # one per loop, shared by the nodes it hosts
    seen: list[int] = []
    finished = asyncio.Event()

    def record(i: int) -> None:
        seen.append(i)
        if i == 499:
            finished.set()

    def fail() -> None:
        raise RuntimeError("boom")

    def producer() -> None:
        for i in range(500):
            poster.post(record, i)
            if i == 250:
                poster.post(fail)

    thread = threading.Thread(target=producer)
    thread.start()
    await asyncio.wait_for(finished.wait(), timeout=10)
    thread.join()
    assert seen == list(range(500))
