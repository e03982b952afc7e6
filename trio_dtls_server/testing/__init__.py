"""A pytest-trio harness for testing DTLS programs."""
