"""Hi-DLR in other training stacks, one small module per framework; each imports its framework lazily.

- :mod:`hidlr_hpo.integrations.huggingface`: a ``transformers.Trainer`` optimizer factory and a logging callback;
- :mod:`hidlr_hpo.integrations.lightning`: a Lightning callback that logs the group rates Hi-DLR chose.

``HiDLR`` is a ``torch.optim.Optimizer``, so both frameworks drive it as they drive any optimizer: these
modules only build it from what the framework has in hand and make its rates visible in the framework's logs.
"""
