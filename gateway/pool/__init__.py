"""The gateway's pool side: worker processes and the requests they owe.

One :class:`gateway.pool.runtime.Runtime` holds a
:class:`gateway.pool.model.ModelRuntime` per served model: its records of
workers (:mod:`~gateway.pool.workers`), a dispatcher that hands requests to
them (:mod:`~gateway.pool.dispatch`, :mod:`~gateway.pool.streams`), and a
supervisor that spawns, watches and replaces them (:mod:`~gateway.pool.supervisor`,
:mod:`~gateway.pool.succession`, :mod:`~gateway.pool.process`,
:mod:`~gateway.pool.placement`), all over one ZeroMQ transport
(:mod:`~gateway.pool.transport`). Nothing here knows about HTTP.
"""
