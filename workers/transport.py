"""The replicas' kombu transport: Redis, with every taken message kept where recovery finds it.

kombu's Redis transport takes a message with ``BRPOP`` and only then records it in its
``unacked`` hash: a replica killed between the two loses the message, and one killed after it
leaves the message there until the visibility timeout, an hour later (celery #5935). Here a
replica takes its message with ``BLMOVE`` into a list of its own
(``keys.taken``), one atomic step that survives a broker restart
with AOF, and acknowledges by emptying that list in the same round trip (a MULTI) as its
reply. Whatever a replica's list holds when it dies is exactly what it held: its supervisor
or the scaler puts it back (:meth:`inferq.registry.Queues.recover`), and a replica whose
connection to the broker broke puts it back itself when it consumes again.

Celery selects it with ``broker_transport`` and finds the list's name and the replica's queue
in ``broker_transport_options`` (``inferq_taken_key``, ``inferq_queue``). Only the channel
that consumes that queue takes and acknowledges this way; every other channel of the process
(remote control, events) is kombu's own, so none of them can touch the taken list.
"""

from __future__ import annotations

import json
import logging
from time import monotonic
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.transport.virtual.base import Empty
from kombu.utils.encoding import bytes_to_str

logger = logging.getLogger("inferq.worker")

TAKEN_KEY_OPTION = "inferq_taken_key"
QUEUE_OPTION = "inferq_queue"


class QoS(kombu_redis.QoS):
    """Acknowledgement by the taken list instead of kombu's ``unacked`` hash."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        if not self.channel.taken_key:
            return super().append(message, delivery_tag)
        # Already recorded: BLMOVE put it in the taken list. Only local bookkeeping.
        return virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: Any) -> None:
        channel = self.channel
        if not channel.taken_key:
            return super().ack(delivery_tag)
        pipe = channel.ack_pipeline()  # MULTI: the reply and the acknowledgement, or neither
        for command in channel.take_with_ack():
            pipe.execute_command(*command)
        pipe.delete(channel.taken_key)
        for result in pipe.execute(raise_on_error=False):
            if isinstance(result, Exception):  # a statistic, say: never the acknowledgement
                logger.warning("a command sent with an acknowledgement failed: %s", result)
        return virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        channel = self.channel
        if not channel.taken_key:
            return super().reject(delivery_tag, requeue=requeue)
        if requeue:
            channel.restore_taken()
        else:
            with channel.conn_or_acquire() as client:
                client.delete(channel.taken_key)
        return virtual.QoS.ack(self, delivery_tag)

    def restore_unacked(self, client: Any = None) -> None:
        if not self.channel.taken_key:
            return super().restore_unacked(client)
        self.channel.restore_taken()
        self._delivered.clear()
        return None


class Channel(kombu_redis.Channel):
    """kombu's Redis channel, taking messages with BLMOVE (see the module doc)."""

    QoS = QoS
    # kombu's own polling state, which _brpop_start and _brpop_read keep as kombu does.
    _in_poll: Any
    _brpop_sent_at: Any  # kombu declares it None, and sets a monotonic time

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        options = self.connection.client.transport_options or {}
        self._taken_key: str | None = options.get(TAKEN_KEY_OPTION)
        self._queue: str | None = options.get(QUEUE_OPTION)
        self.taken_key: str | None = None  # set once this channel consumes the replica's queue
        self._after_ack: list[tuple] = []
        self._moving: str | None = None  # the queue a BLMOVE in progress reads
        self._commands: Any = None  # a Redis client for the replica's own commands
        self._ack_pipe: Any = None

    @property
    def commands(self) -> Any:
        """A Redis client kept for the replica's own commands (not the one polling BLMOVE):
        kombu makes a client per ``conn_or_acquire``, and redis-py copies ~200 response
        callbacks into each client and pipeline, which costs more than a round trip."""
        if self._commands is None:
            self._commands = self._create_client()
        return self._commands

    def ack_pipeline(self) -> Any:
        """A MULTI pipeline kept for acknowledgements (see :attr:`commands`)."""
        if self._ack_pipe is None:
            self._ack_pipe = self.commands.pipeline()
        elif self._ack_pipe.command_stack:  # left over by a failed build: never send it
            self._ack_pipe.reset()
        return self._ack_pipe

    def send_with_ack(self, *command: Any) -> None:
        """Have the next acknowledgement run ``command`` (e.g. the reply) in its MULTI."""
        self._after_ack.append(command)

    def take_with_ack(self) -> list[tuple]:
        commands, self._after_ack = self._after_ack, []
        return commands

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        if self._taken_key and queue == self._queue:
            self.taken_key = self._taken_key
            # A message left in the taken list was taken before the connection (or the
            # broker) went away and never acknowledged: serve it again, first.
            self.restore_taken()
        return super().basic_consume(queue, *args, **kwargs)

    def restore_taken(self) -> None:
        """Move every message of the taken list back to the head of its queue."""
        with self.conn_or_acquire() as client:
            while True:
                raw = client.lindex(self.taken_key, -1)
                if raw is None:
                    return
                queue = json.loads(raw)["properties"]["delivery_info"]["routing_key"]
                client.lmove(self.taken_key, queue, "RIGHT", "RIGHT")

    def _brpop_start(self, timeout: float | None = None) -> None:
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not self.taken_key or len(queues) != 1:
            self._moving = None
            return super()._brpop_start(timeout)
        if timeout is None:
            timeout = self.brpop_timeout
        self._moving = queues[0]
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        self.client.connection.send_command(
            "BLMOVE", queues[0], self.taken_key, "RIGHT", "LEFT", timeout or 0
        )

    def _brpop_read(self, **options: Any) -> bool:
        queue = self._moving
        if queue is None:
            return super()._brpop_read(**options)
        try:
            try:
                item = self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if item is None:
                raise Empty()
            self._queue_cycle.rotate(queue)
            self.connection._deliver(json.loads(bytes_to_str(item)), queue)
            return True
        finally:
            self._in_poll = None
            self._moving = None
            self._flush_brpop_reauth()


class Transport(kombu_redis.Transport):
    Channel = Channel
