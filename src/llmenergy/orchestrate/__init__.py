"""Runs cells: Snakemake glue, submitit submission, the cell launcher, provenance."""
