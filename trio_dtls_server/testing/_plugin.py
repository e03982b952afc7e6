"""pytest plugin: fixtures for testing DTLS programs (registered through ``pytest11``)."""
