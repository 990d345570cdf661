"""The `atelier` command line: the top floor. It parses, calls flows (and registry reads) and prints;
nothing below imports it. `cli/stack_processes.py` supervises the servers of `atelier up`."""
