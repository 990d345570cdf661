"""`python -m atelier.cli ...` is `atelier ...`."""

from atelier.cli.main import main

main()
