"""The serving loop: read requests off the data socket, batch, run, reply.

:mod:`~worker.serve.loop` owns the socket; :mod:`~worker.serve.batching`
groups requests around one forward pass, :mod:`~worker.serve.pacing` decides
how long a batch may wait for more, and :mod:`~worker.serve.streaming` runs
handlers that answer in chunks.
"""
