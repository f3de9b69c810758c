"""Loading a model, whatever its kind, and the contract a handler class fulfils.

:mod:`~worker.model.loading` turns every model source (TorchScript,
torch.export, state_dict + class, a pickled module, a handler, the built-in
:mod:`~worker.model.demo`) into one ``LoadedModel``;
:mod:`~worker.model.handler` and :mod:`~worker.model.assembly` are the
handler contract, batching declarations included.
"""
