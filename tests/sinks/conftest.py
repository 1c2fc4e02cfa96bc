"""chDB fixtures live in tests/conftest.py: one chDB engine per process, shared."""
