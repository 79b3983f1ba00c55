"""tests/faults: what goes wrong in real runs, and what moejax promises then (RELIABILITY.md)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/helpers
