"""Side-by-side benchmarks of DataInf against its peers.

`benchmarks/run.py` is the entry point. The package holds:

* [jobs][] — the shared jobs: data, model, training, blocks and λ;
* [tools][] — one adapter per tool, each returning the influence matrix in
  pyDVL's sign (positive = helpful);
* [worker][] — runs one tool on one job in a subprocess and measures it;
* [report][] — metrics against the exact per-block inverse, CSV and markdown.
"""
