"""The torch-free runtime: the bundle contract, the registry of choices, the onnxruntime session, preprocessing,
dynamic batching and the ``Classifier`` service that every transport calls.

Nothing here imports torch, FastAPI or the other mcc packages; ``mcc_train`` uses only ``choices``, and ``export``
uses this layer to write and prove bundles and to evaluate them as they are served.
"""
