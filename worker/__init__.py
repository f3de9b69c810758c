"""The torchpool worker: one pinned process that loads a model and serves it.

Started as a fresh interpreter, ``python -m worker --connect ENDPOINT ...``
(the flags are :class:`shared.config.WorkerSettings`). The process itself lives at the top:

    main       boot sequence: settings, pinning, sockets, load, serve, exit codes
    pinning    CPU affinity, thread counts, CUDA_VISIBLE_DEVICES (before torch)
    control    the thread that owns the control socket: lifecycle and heartbeats
    stats      live memory figures for heartbeats and READY
    signals    stop signals turned into a wake-up of the serving loop
    pytree     nested structures of tensors, used by all three families below

and three families below it, imported in this direction only:

    serve/     the data-socket loop: collect, batch, forward, reply, stream
    model/     every model source -> LoadedModel; the handler contract
    codec/     request bodies -> tensors, results -> reply bodies

Nothing here imports torch at package import time; ``worker.main`` imports the
torch-using modules only after pinning is applied.
"""
