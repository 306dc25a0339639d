"""The pipeline stages: plain functions over iterables of records."""
