"""A simulated Aztec node: tests, the demo and the benchmark run against it."""
