"""Dataset builders' tools: turn raw dumps into WebDataset shards and train a tokenizer.

Run them as ``python -m data_tools.convert --help`` and ``python -m data_tools.tokenizer --help``
(console scripts ``clipforge-convert`` and ``clipforge-tokenizer``). Nothing under
``src/clipforge`` imports this package: the shard folder and its ``manifest.json`` are the contract.
"""
