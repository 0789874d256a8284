"""The worker's output producer: confluent-kafka (librdkafka batches in C) behind asyncio.

One future per batch, not per message: the delivery callbacks, which run on whichever
thread polls librdkafka (normally our poll thread), only count; the last one of a batch
hands the outcome to the event loop with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Sequence

from confluent_kafka import KafkaError, KafkaException, Producer

from streams.shared.kafka_config import client_config

log = logging.getLogger(__name__)

OUTPUT_PRODUCER_DEFAULTS = {
    # Faust's aiokafka producer (what sent recommendations before) and Java clients hash keys
    # with murmur2; librdkafka's default (consistent_random) uses crc32 and would move users
    # to other partitions. murmur2_random keeps every user id on the partition it had.
    "partitioner": "murmur2_random",
    "acks": "all",
    "enable.idempotence": True,   # retries neither duplicate nor reorder a partition's messages
    "linger.ms": 2,               # the worker sends whole batches: a short wait fills requests
    # Bytes per partition request: room for a whole worker batch (librdkafka caps it at
    # message.max.bytes).
    "batch.size": 1_000_000,
    "batch.num.messages": 10_000,
}


def producer_config(bootstrap: str, environ=None, **settings) -> dict:
    """Broker address, the shared SASL/TLS settings, the defaults above, then `settings`
    (dots written as underscores, e.g. linger_ms=5)."""
    return {**OUTPUT_PRODUCER_DEFAULTS, **client_config(bootstrap, environ, **settings)}


class _Batch:
    """Delivery bookkeeping of one send_batch call; its callbacks may run on several threads."""

    __slots__ = ("loop", "future", "topic", "total", "pending", "failed", "error", "lock",
                 "offsets")

    def __init__(self, loop: asyncio.AbstractEventLoop, topic: str, total: int,
                 offsets: dict | None = None):
        self.loop, self.topic, self.total = loop, topic, total
        self.future = loop.create_future()
        self.pending = total  # all of them, so that early acks cannot finish the batch early
        self.failed = 0
        self.error: KafkaError | None = None
        self.lock = threading.Lock()
        self.offsets = offsets        # partition -> last offset acked, when asked for

    def on_delivery(self, err, msg) -> None:
        if self.offsets is not None and err is None:
            with self.lock:
                partition = msg.partition()
                self.offsets[partition] = max(self.offsets.get(partition, -1), msg.offset())
        self._count(1, err)

    def abandon(self, unsent: int, err: KafkaError) -> None:
        """Messages that produce() refused: they count as failed, with `err`."""
        self._count(unsent, err)

    def _count(self, n: int, err: KafkaError | None) -> None:
        with self.lock:
            if err is not None:
                self.failed += n
                if self.error is None:
                    self.error = err
            self.pending -= n
            done = self.pending == 0
        if done:
            try:
                self.loop.call_soon_threadsafe(self._settle)
            except RuntimeError:  # loop closed: nobody waits any more; never raise into poll()
                pass

    def _settle(self) -> None:
        if self.future.done():  # cancelled by its waiter
            return
        if self.error is None:
            self.future.set_result(self.total if self.offsets is None else self.offsets)
        else:
            self.future.set_exception(
                DeliveryError(self.error, self.topic, self.failed, self.total))


class DeliveryError(KafkaException):
    """Some messages of a batch were not delivered; args[0] is the first KafkaError."""

    def __init__(self, error: KafkaError, topic: str, failed: int, total: int):
        super().__init__(error)
        self.error, self.topic, self.failed, self.total = error, topic, failed, total

    def __str__(self) -> str:
        return (f"{self.failed} of {self.total} messages to {self.topic!r} not delivered; "
                f"first error: {self.error.name()}: {self.error.str()}")


class AsyncProducer:
    """confluent-kafka Producer for asyncio code: send_batch(...) -> one awaitable future.

    config: a confluent-kafka configuration (e.g. producer_config(bootstrap)); the output
    defaults apply under it. loop: the event loop the futures belong to (default: the
    running one). A daemon thread polls librdkafka so that acks are served without the loop.
    """

    def __init__(self, config: dict, loop: asyncio.AbstractEventLoop | None = None,
                 poll_interval: float = 0.05):
        self._loop = loop or asyncio.get_running_loop()
        self._producer = Producer({**OUTPUT_PRODUCER_DEFAULTS, **config})
        self._poll_interval = poll_interval
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="output-producer-poll",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                self._producer.poll(self._poll_interval)
            except Exception:  # noqa: BLE001 - a dead poll thread would leave every batch hanging
                log.exception("output producer: poll failed")

    def send_batch(self, topic: str, items: Sequence[tuple[bytes, bytes]]) -> asyncio.Future:
        """Produce (key, value) pairs in order; the future resolves to their number once the
        broker has acknowledged all of them, or fails with DeliveryError (a KafkaException)
        naming the first error. Blocks only while librdkafka's queue is full."""
        return self._send(topic, [(key, value, -1) for key, value in items], None)

    def send_to_partitions(self, topic: str, items: Sequence[tuple[int, bytes, bytes]]
                           ) -> asyncio.Future:
        """Produce (partition, key, value) triples in order, each to its partition; the future
        resolves to {partition: offset of its last message} once all are acknowledged."""
        return self._send(topic, [(key, value, partition) for partition, key, value in items],
                          {})

    def _send(self, topic: str, items, offsets: dict | None) -> asyncio.Future:
        if self._closed:
            raise RuntimeError("AsyncProducer is closed")
        batch = _Batch(self._loop, topic, len(items), offsets)
        if not items:
            batch.future.set_result(0 if offsets is None else offsets)
            return batch.future
        produce, on_delivery = self._producer.produce, batch.on_delivery
        for sent, (key, value, partition) in enumerate(items):
            while True:
                try:
                    produce(topic, value=value, key=key, partition=partition,
                            on_delivery=on_delivery)
                    break
                except BufferError:
                    # Queue full: wait for acks to make room, then retry this same message,
                    # so nothing is skipped or overtaken.
                    self._producer.poll(self._poll_interval)
                except KafkaException as exc:
                    # Refused before sending (e.g. larger than message.max.bytes): the rest
                    # of the batch is not sent, so later messages cannot overtake it.
                    err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) \
                        else KafkaError(KafkaError._INVALID_ARG, str(exc))
                    batch.abandon(len(items) - sent, err)
                    return batch.future
        return batch.future

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for every queued message's outcome; the number still undelivered."""
        return self._producer.flush(timeout)

    def close(self, timeout: float = 30.0) -> int:
        """Flush, then stop the poll thread. Messages still queued after `timeout` are purged,
        which fails their batches instead of leaving them pending. Returns how many those were."""
        if self._closed:
            return 0
        self._closed = True
        left = self._producer.flush(timeout)
        if left:
            self._producer.purge()
            self._producer.flush(1.0)  # serve the purge callbacks (their batches fail)
        self._stop.set()
        self._thread.join()
        return left
