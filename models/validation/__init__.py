"""Data validation: facts about data sets, checked by Great Expectations suites."""
