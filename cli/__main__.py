"""`python -m cli ...` is `atelier ...`."""

from cli.main import main

main()
