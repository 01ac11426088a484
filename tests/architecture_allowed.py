"""Architecture rules broken today (tests/test_architecture.py); the list only shrinks."""

ALLOWED = [
]
