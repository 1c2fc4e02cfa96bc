"""Benchmarks are not tests: `make bench` runs them; `make test` skips this folder."""
