"""The parts of ``python -m benchmarks.bench_gpu`` (the entry point: its options, plans and the order of the parts).

* ``timing``: the run's log line, its sizes (full or CPU smoke), the clock, the round-robin timer, the profile;
* ``flops``: the FLOP count and the cards' bf16 peaks (MFU);
* ``shards``: the LFW faces as WebDataset shards; ``loops``: the bare loop, the real Trainer, an in-memory batch;
* one module per part: ``loader``, ``train`` (the training step and the levers), ``scan``, ``classifier`` (with
  the buffer-count model of its peak), ``dali``;
* ``report``: bench_gpu.md and bench_gpu.json.
"""
