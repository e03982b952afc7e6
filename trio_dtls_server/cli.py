"""The ``trio-dtls-server`` command."""


def main() -> None:
    raise SystemExit("not implemented yet")
