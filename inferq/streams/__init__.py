"""Streams: an API that consumes a Redis stream, answering each entry into another stream.

A ``stream:`` section in an API's spec (:class:`inferq.configs.Stream`) makes consuming its
source part of the deployment: while the API is deployed, one consumer process, on the host
whose scaler holds the stream's lease (:class:`StreamRunner`), reads the source through the
consumer group ``inferq:<api>``, sends the samples through the API's queue to its replicas,
and adds each answer to the sink, acknowledging an entry only with its answer (at least once;
a ``source_id`` to deduplicate on). Deleting the API stops it; the group stays, so a redeploy
goes on where it stopped. The consumer reports its counts and the source's lag to the broker
(:class:`Streams`), which the scalers count like queued requests.

==========================  ===============================================================
:mod:`.endpoints`           the source and sink behind a small interface; Redis Streams
:mod:`.consumer`            the consumer process
:class:`Streams`            leases and reports in the broker
:class:`StreamRunner`       what a scaler needs: consumers for the streams that want one
==========================  ===============================================================
"""

from inferq.streams.records import Streams, StreamState
from inferq.streams.runner import StreamRunner

__all__ = ["StreamRunner", "StreamState", "Streams"]
