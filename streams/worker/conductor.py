"""Faust's conductor with a short path for topics of raw bytes: a fetched message becomes its
agent's event without a trip through Faust's serializer registry.

Faust's conductor hands each fetched message to the channels that subscribe to its topic. Per
message it looks up flow control and the producer buffer's size through `app.conf` (a settings
registry whose every attribute read is a Python call chain), decodes key and value through the
registry's codec lookup, builds the event through `app.conf.Event`, and puts it in the channel's
queue. For the worker's input (one agent, key and value raw bytes: the click is decoded by the
agent's reader) that decoding returns the bytes it was given; under a backlog it was 42% of the
event loop's GIL time, most of it lookups (docs/RESULTS.md 4l).

`RawBytesHandler` does the same steps with what they look up bound once per partition:
  - wait while flow control is suspended (a rebalance; `hold_events_until_streams_resume` in
    streams/worker/app.py relies on this wait);
  - wait while Faust's producer buffer is over its limit (the dead letters go through it);
  - one reference on the message for the one channel, so it is committed only once acked;
  - the event (Faust's own class, the message's key, value and headers as they are) into the
    channel's queue, with Faust's high/low-pressure callbacks that pause and resume fetching
    the partition; a full queue is waited on, as Faust does.
Any other subscription (several channels, another serializer, a schema) keeps Faust's handler.

And the lookup of a message's handler takes the lock that guards the handlers only when
someone holds it (a resubscription, which empties and refills them across an await): Faust
takes it for every message, an acquire and release per message for a lock that is almost
never held. Without a holder, taking it could not have changed which handler is found.
"""

from __future__ import annotations

from faust.serializers.schemas import Schema
from faust.transport import conductor as faust_conductor


def raw_bytes_channel(channels) -> object | None:
    """The one channel of `channels` if its schema is Faust's own and takes key and value as
    raw bytes (what Faust's decoding then returns unchanged), else None."""
    if len(channels) != 1:
        return None
    (channel,) = channels
    schema = getattr(channel, "schema", None)
    raw = (type(schema) is Schema
           and schema.key_serializer == "raw" and schema.value_serializer == "raw"
           and schema.key_type in (bytes, None) and schema.value_type in (bytes, None))
    return channel if raw else None


class RawBytesHandler:
    """The conductor's callback for one partition whose one channel takes raw bytes."""

    def __init__(self, app, tp, channel):
        self.tp, self.channel, self.app = tp, channel, app
        self.flow_control = app.flow_control
        self.event_class = app.conf.Event
        buffer = app.producer.buffer
        self.buffer = buffer
        self.buffer_limit = buffer.max_messages
        self.threaded_producer = app.conf.producer_threaded
        self.on_topic_buffer_full = app.sensors.on_topic_buffer_full
        self.on_buffer_full = app.consumer.on_buffer_full
        self.on_buffer_drop = app.consumer.on_buffer_drop

    def producer_buffered(self) -> int:
        """Messages waiting in Faust's producer buffer (ProducerBuffer.size without its
        settings lookup)."""
        queue = self.buffer.queue if self.threaded_producer else self.buffer.pending
        return queue.qsize() if queue is not None else 0

    def on_pressure_high(self) -> None:
        self.on_topic_buffer_full(self.tp)
        self.on_buffer_full(self.tp)

    def on_pressure_drop(self) -> None:
        self.on_buffer_drop(self.tp)

    async def __call__(self, message) -> None:
        if not self.flow_control.is_active():
            await self.flow_control.acquire()
        if self.producer_buffered() > self.buffer_limit:
            await self.buffer.wait_until_ebb()
        message.incref()
        event = self.event_class(self.app, message.key, message.value, message.headers,
                                 message)
        queue = self.channel.queue
        if queue.full():
            self.on_topic_buffer_full(self.tp)
            await self.channel.put(event)
        else:
            queue.put_nowait_enhanced(event, on_pressure_high=self.on_pressure_high,
                                      on_pressure_drop=self.on_pressure_drop)


class Conductor(faust_conductor.Conductor):
    """Set as the worker's transport's conductor (streams/worker/consumer.py)."""

    def _compile_message_handler(self):
        if self.app.client_only:
            return super()._compile_message_handler()
        handlers, lock = self._tp_to_callback, self._tp_to_callback_lock

        async def on_message(message) -> None:
            if lock.locked():
                async with lock:
                    handler = handlers[message.tp]
            else:
                handler = handlers[message.tp]
            return await handler(message)

        return on_message

    def _build_handler(self, tp, channels):
        channel = raw_bytes_channel(channels)
        if channel is None:
            return super()._build_handler(tp, channels)
        return RawBytesHandler(self.app, tp, channel)
