"""Faust's aiokafka transport with three changes: a seek "to the committed offsets" also seeks
an input partition that has none back to its beginning, the drain loop hands a message to
the conductor without four asyncio tasks per message, and the conductor hands a raw-bytes
topic's message to its agent without Faust's decoding (streams/worker/conductor.py).

The seek.

Faust ends every table recovery with `Consumer.perform_seek`, which asks aiokafka to seek each
assigned partition to its committed offset. aiokafka's `seek_to_committed` skips a partition
whose committed offset is None or 0, and so leaves its position wherever the fetcher had taken
it. Records fetched from such a partition during the recovery and then dropped on the way to
the agent (Faust drops records of partitions it has not resumed, a consumer flow suspended by
the rebalance, stream queues emptied on resume) are then never read again: the position is past
them and nothing will be committed before them. That is the silent worker after a restart
that crashed before its first commit (docs/RELIABILITY.md, "the stall"): every partition
assigned, unpaused, its end past what was read, committed None.

Seeking such a partition to its beginning reads it again from the first record, as
`auto_offset_reset=earliest` means for a group that has committed nothing; the state records
skip what they have already applied, so nothing is applied twice. Changelog partitions are
left alone: Faust positions those itself and never commits them.

The drain loop. Faust's `Consumer._drain_messages` delivers each message with
`wait_first(callback(message), suspend_flow.wait())`, so that a rebalance that suspends the
consumer's flow can abandon a delivery stuck at a full queue or at suspended flow control. That
creates and cancels four tasks per message (the callback, the suspend event, the service's
stopped and crashed events): ~30-60 us a message here, a tenth of the event loop under load
(docs/RESULTS.md, 4e). The conductor's callback almost never waits (an uncontended lock, flow
control on, room in the queue), so `deliver` first runs it to its first wait in place; only if
it does wait does the rest go through `wait_first` as before. Everything else in the loop
(what is dropped, gaps, commits, read offsets, how it stops) is Faust 0.15.3's, restated.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine, Iterable, Mapping

from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka

from streams.worker.conductor import Conductor


async def seek_to_committed_or_beginning(consumer, partitions: Iterable,
                                         is_changelog: Callable[[object], bool]) -> Mapping:
    """consumer: an aiokafka.AIOKafkaConsumer in a group. Seek each of `partitions` to its
    committed offset, and those without one (None or 0) that are not changelogs to their
    beginning. Returns {partition: committed offset or None}, as aiokafka's seek does."""
    partitions = list(partitions)
    if not partitions:
        return {}
    committed = await consumer.seek_to_committed(*partitions)
    never = [tp for tp, offset in committed.items() if not offset and not is_changelog(tp)]
    if never:
        await consumer.seek_to_beginning(*never)
    return committed


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    async def seek_to_committed(self) -> Mapping:
        consumer = self._ensure_consumer()
        return await self.call_thread(
            seek_to_committed_or_beginning, consumer, consumer.assignment(),
            lambda tp: tp.topic in self.app.tables.changelog_topics)


async def _go_on(coro: Coroutine, waiting_on: Any) -> Any:
    """The rest of a coroutine that `coro.send(None)` left waiting on `waiting_on` (what it
    yielded: a future, or None for a bare yield), driven as its own task would drive it.
    A cancellation of this task reaches the coroutine: through the future it waits on (the
    task cancels that future, and the coroutine's await then raises), or thrown in."""
    while True:
        try:
            if waiting_on is None:
                await asyncio.sleep(0)
            else:
                await waiting_on
            error = None
        except BaseException as exc:  # noqa: BLE001 - handed to the coroutine, which decides
            # A future that is done raises its outcome inside the coroutine when it resumes.
            error = None if waiting_on is not None and waiting_on.done() else exc
        try:
            waiting_on = _taken(coro.send(None) if error is None else coro.throw(error))
        except StopIteration as stop:
            return stop.value


def _taken(waiting_on: Any) -> Any:
    """What a coroutine yielded, taken as a task takes it: a future it awaits is marked
    blocking until someone waits on it (awaiting it again without this raises)."""
    if getattr(waiting_on, "_asyncio_future_blocking", False):
        waiting_on._asyncio_future_blocking = False
    return waiting_on


async def deliver(coro: Coroutine, abandon_on, wait_first) -> None:
    """Run `coro` (a delivery) to its end. If it completes without waiting, that is all;
    otherwise the rest waits under `wait_first(rest, abandon_on.wait())`, Faust's rule: a
    delivery still waiting when `abandon_on` is set is cancelled, its message dropped."""
    try:
        waiting_on = _taken(coro.send(None))
    except StopIteration:
        return
    await wait_first(_go_on(coro, waiting_on), abandon_on.wait())


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _drain_messages(self, fetcher) -> None:  # pragma: no cover - the worker's loop
        """Faust's drain loop (see the module's docstring), delivering through `deliver`."""
        callback, suspend_flow = self.callback, self.suspend_flow
        read_offset = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
        since_yield = 0
        try:
            while not (self._stopped.is_set() or fetcher._stopped.is_set()):
                self.diag.set_flag(faust_consumer.CONSUMER_FETCHING)
                messages = self.getmany(timeout=1.0)
                await self.sleep(0)     # getmany can return at once, forever
                if self.should_stop:
                    continue
                async for tp, message in messages:
                    since_yield += 1
                    if since_yield > 100:
                        await asyncio.sleep(0)
                        since_yield = 0
                    offset, last_read = message.offset, read_offset.get(tp)
                    if last_read is not None and offset < last_read:
                        continue        # read before a seek back: Faust drops it too
                    if last_read and offset - last_read > 1 and acks_enabled_for(message.topic):
                        await self._add_gap(tp, last_read + 1, offset)
                    if self._commit_every is not None and self._n_acked >= self._commit_every:
                        self._n_acked = 0
                        await self.commit()
                    if suspend_flow.is_set():
                        # A rebalance has begun: Faust's own path, which drops the message.
                        await self.wait_first(callback(message), suspend_flow.wait())
                    else:
                        await deliver(callback(message), suspend_flow, self.wait_first)
                    read_offset[tp] = offset
                self.diag.unset_flag(faust_consumer.CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            self.diag.unset_flag(faust_consumer.CONSUMER_FETCHING)


class Transport(faust_aiokafka.Transport):
    """Set as `app.transport` before the app starts (create_app)."""
    Consumer = _Consumer
    Conductor = Conductor       # raw-bytes topics skip Faust's decoding (streams/worker/conductor.py)
