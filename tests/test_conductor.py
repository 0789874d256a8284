"""The worker's conductor (streams/worker/conductor.py): a raw-bytes topic's messages reach the
agent's channel as the same events Faust's own decoding makes, with Faust's flow control, back
pressure and reference counting; any other subscription keeps Faust's handler."""

from __future__ import annotations

import asyncio

import faust
import pytest
from faust.types.tuples import TP, ConsumerMessage

from streams.worker.conductor import RawBytesHandler
from streams.worker.consumer import Transport


def _app(maxsize: int | None = None):
    settings = {"stream_buffer_maxsize": maxsize} if maxsize else {}
    app = faust.App("conductor-test", broker="kafka://127.0.0.1:1", **settings)
    app.transport = Transport(app.conf.broker_consumer, app)
    return app


def _raw_channel(app, name="clicks"):
    topic = app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw",
                      value_serializer="raw")
    return topic.clone(is_iterator=True)


def _message(offset=5, key=b"user-1", value=b"\x02avro", headers=(("h", b"1"),)):
    return ConsumerMessage("clicks", 0, offset, 0.0, 0, list(headers), key, value, None)


@pytest.mark.parametrize("key,value", [(b"user-1", b"\x02avro"), (None, b"v"), (b"k", None),
                                       (b"", b"")])
def test_a_raw_message_becomes_the_event_faust_would_make(key, value):
    async def run():
        app = _app()
        app.flow_control.resume()
        channel = _raw_channel(app)
        handler = app.topics._build_handler(TP("clicks", 0), {channel})
        assert isinstance(handler, RawBytesHandler)
        message = _message(key=key, value=value)
        await handler(message)
        event = channel.queue.get_nowait()
        faust_event = await channel.decode(message, propagate=True)
        assert type(event) is type(faust_event)
        assert (event.key, event.value, event.headers) == \
            (faust_event.key, faust_event.value, faust_event.headers)
        assert event.message is message
        assert message.refcount == 1      # held until the agent acks it: committed only then
    asyncio.run(run())


def test_other_subscriptions_keep_fausts_handler():
    app = _app()
    json_topic = app.topic("other", value_serializer="json").clone(is_iterator=True)
    raw_a, raw_b = _raw_channel(app), _raw_channel(app)
    for channels in ({json_topic}, {raw_a, raw_b}):
        handler = app.topics._build_handler(TP("other", 0), channels)
        assert not isinstance(handler, RawBytesHandler)


def test_a_message_waits_while_flow_control_is_suspended():
    async def run():
        app = _app()
        app.flow_control.suspend()          # a rebalance
        channel = _raw_channel(app)
        handler = app.topics._build_handler(TP("clicks", 0), {channel})
        delivery = asyncio.ensure_future(handler(_message()))
        await asyncio.sleep(0.05)
        assert not delivery.done() and channel.queue.empty()
        app.flow_control.resume()
        await asyncio.wait_for(delivery, 5)
        assert channel.queue.qsize() == 1
    asyncio.run(run())


def test_a_full_queue_pauses_the_partition_and_waits_for_room():
    async def run():
        app = _app(maxsize=4)
        app.flow_control.resume()
        paused, resumed = [], []
        app.consumer.on_buffer_full = paused.append
        app.consumer.on_buffer_drop = resumed.append
        channel = _raw_channel(app)
        tp = TP("clicks", 0)
        handler = app.topics._build_handler(tp, {channel})
        for offset in range(4):
            await handler(_message(offset=offset))
        assert paused == [tp]               # high pressure: stop fetching this partition
        delivery = asyncio.ensure_future(handler(_message(offset=4)))
        await asyncio.sleep(0.05)
        assert not delivery.done()          # full: waits, nothing dropped
        taken = [channel.queue.get_nowait().message.offset for _ in range(4)]
        await asyncio.wait_for(delivery, 5)
        taken.append(channel.queue.get_nowait().message.offset)
        assert taken == [0, 1, 2, 3, 4]
        assert resumed == [tp]              # drained below the low mark: fetching again
    asyncio.run(run())


def test_a_message_waits_while_the_handlers_are_being_replaced():
    """A resubscription holds the handlers' lock while it empties and refills them (across
    an await): a message then waits for it, and is found by the new handler. Unheld, the
    lookup takes no lock."""
    async def run():
        app = _app()
        app.flow_control.resume()
        conductor = app.topics
        tp = TP("clicks", 0)
        old, new = _raw_channel(app), _raw_channel(app)
        conductor._tp_to_callback[tp] = conductor._build_handler(tp, {old})
        await conductor.on_message(_message(offset=1))
        assert old.queue.qsize() == 1
        async with conductor._tp_to_callback_lock:
            conductor._tp_to_callback.clear()
            delivery = asyncio.ensure_future(conductor.on_message(_message(offset=2)))
            await asyncio.sleep(0.05)
            assert not delivery.done()
            conductor._tp_to_callback[tp] = conductor._build_handler(tp, {new})
        await asyncio.wait_for(delivery, 5)
        assert new.queue.get_nowait().message.offset == 2 and old.queue.qsize() == 1
    asyncio.run(run())
