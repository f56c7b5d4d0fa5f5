"""PaySentry benchmarks: `make bench` prints the tables."""
