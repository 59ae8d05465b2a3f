"""The benchmarks that bench.py runs, one file per job; common.py holds their timing and their table."""
