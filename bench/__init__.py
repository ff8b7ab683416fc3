"""The benchmarks (``make bench-*``); ``bench.harness`` is what they share."""
