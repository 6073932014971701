"""The ``walt`` command (console script and ``python -m walt``): ``walt serve`` starts without importing Lightning,
which it does not use (seconds of start-up); every other command, and the help, is :func:`walt.cli.main`."""

import sys


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        from walt.serve import serve_main

        sys.exit(serve_main(sys.argv[2:]))
    from walt.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
