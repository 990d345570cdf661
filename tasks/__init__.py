"""Prefect tasks: thin, versioned adapters over models/ and registry/ returning small results."""
