"""The seek that ends a table recovery, against a real broker (streams/worker/consumer.py).

A group member that has read past records without committing them, then is asked to seek to
its committed offsets: aiokafka alone leaves it past them (what made a restarted worker silent
for good: docs/RELIABILITY.md), ours reads them again from the first."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tests.kafka_broker import create_topics


def _read_past_then_seek(bootstrap: str, seek) -> dict[int, tuple[int, int]]:
    """Produce 10 records to each of 2 partitions; a group member reads them all (partition 0
    is then committed at 4, partition 1 never), then `seek(consumer)`. Returns {partition:
    (position after the seek, offset of the first record read after it, None at the end)}."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    topic = f"seek-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, {topic: 2})
    tps = [TopicPartition(topic, p) for p in (0, 1)]

    async def run():
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            for i in range(10):
                for tp in tps:
                    await producer.send(topic, value=b"%d" % i, partition=tp.partition)
            await producer.flush()
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=f"g-{topic}",
                                    enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        try:
            consumer.assign(tps)
            seen = {tp: 0 for tp in tps}
            while min(seen.values()) < 10:
                for tp, records in (await consumer.getmany(timeout_ms=1000)).items():
                    seen[tp] += len(records)
            await consumer.commit({tps[0]: 4})
            await seek(consumer)
            after = {}
            for tp in tps:
                position = await consumer.position(tp)
                records = []
                while position < 10 and not records:
                    records = (await consumer.getmany(tp, timeout_ms=1000)).get(tp, [])
                after[tp.partition] = (position, records[0].offset if records else None)
            return after
        finally:
            await consumer.stop()

    return asyncio.run(run())


def test_aiokafka_alone_leaves_a_partition_never_committed_past_what_it_read(
        kafka_bootstrap_server):
    async def aiokafka_seek(consumer):
        await consumer.seek_to_committed()

    after = _read_past_then_seek(kafka_bootstrap_server, aiokafka_seek)
    assert after[0] == (4, 4)
    # Past all ten: only a record produced later would be read.
    assert after[1] == (10, None)


def test_our_seek_reads_a_partition_never_committed_again_from_its_beginning(
        kafka_bootstrap_server):
    from streams.worker.consumer import seek_to_committed_or_beginning

    async def our_seek(consumer):
        committed = await seek_to_committed_or_beginning(
            consumer, consumer.assignment(), is_changelog=lambda tp: False)
        assert {tp.partition: offset for tp, offset in committed.items()} == {0: 4, 1: None}

    after = _read_past_then_seek(kafka_bootstrap_server, our_seek)
    assert after == {0: (4, 4), 1: (0, 0)}


def test_our_seek_leaves_changelog_partitions_where_they_are(kafka_bootstrap_server):
    from streams.worker.consumer import seek_to_committed_or_beginning

    async def our_seek(consumer):
        await seek_to_committed_or_beginning(
            consumer, consumer.assignment(), is_changelog=lambda tp: tp.partition == 1)

    after = _read_past_then_seek(kafka_bootstrap_server, our_seek)
    assert after == {0: (4, 4), 1: (10, None)}


# -- deliver: a message handed to the conductor without tasks, unless the delivery waits -------

def _wait_first():
    """mode's Service.wait_first, as the consumer has it."""
    from mode import Service
    return Service().wait_first


def test_a_delivery_that_does_not_wait_runs_to_its_end_in_place():
    from streams.worker.consumer import deliver

    done = []

    async def delivery():
        done.append("delivered")

    async def run():
        tasks_before = len(asyncio.all_tasks())
        coro = delivery()
        # Before the first await of deliver yields, the delivery has already happened.
        await deliver(coro, asyncio.Event(), _wait_first())
        return tasks_before, len(asyncio.all_tasks())

    before, after = asyncio.run(run())
    assert done == ["delivered"] and before == after


def test_a_delivery_that_waits_goes_on_when_its_wait_ends_and_gets_the_result():
    from streams.worker.consumer import deliver

    got = []

    async def delivery(room: asyncio.Future, turns: int):
        for _ in range(turns):
            await asyncio.sleep(0)            # bare yields are driven too
        got.append(await room)

    async def run():
        room = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(deliver(delivery(room, 0), asyncio.Event(), _wait_first()))
        await asyncio.sleep(0.01)
        assert not task.done() and got == []
        room.set_result("room")
        await asyncio.wait_for(task, 5)
        yielding = asyncio.ensure_future(
            deliver(delivery(_done("after yields"), 3), asyncio.Event(), _wait_first()))
        await asyncio.wait_for(yielding, 5)

    def _done(value):
        future = asyncio.get_event_loop().create_future()
        future.set_result(value)
        return future

    asyncio.run(run())
    assert got == ["room", "after yields"]


def test_a_waiting_delivery_is_cancelled_when_the_flow_is_suspended():
    from streams.worker.consumer import deliver

    seen = []

    async def delivery(room: asyncio.Future):
        try:
            await room
            seen.append("delivered")
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def run():
        suspend = asyncio.Event()
        room = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(deliver(delivery(room), suspend, _wait_first()))
        await asyncio.sleep(0.01)
        suspend.set()                       # a rebalance begins: the message is dropped
        await asyncio.wait_for(task, 5)
        await asyncio.sleep(0.01)
        return room

    room = asyncio.run(run())
    assert seen == ["cancelled"] and room.cancelled()


def test_an_error_in_a_delivery_reaches_the_drain_loop():
    from streams.worker.consumer import deliver

    async def at_once():
        raise ValueError("bad message")

    async def after_a_wait(room):
        await room
        raise KeyError("late")

    async def run():
        with pytest.raises(ValueError, match="bad message"):
            await deliver(at_once(), asyncio.Event(), _wait_first())
        room = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.01, room.set_result, None)
        with pytest.raises(KeyError, match="late"):
            await deliver(after_a_wait(room), asyncio.Event(), _wait_first())

    asyncio.run(run())
