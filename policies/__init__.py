"""Built-in and example policies, shipped as package data (autoglm_tune.policies)."""

from pathlib import Path

# Read as plain files beside this module: pip installs the package unzipped, and importlib.resources (with the
# zipfile readers it imports) cost `diff` about 4 ms of its start-up (bench/diff_walltime.py).
DIRECTORY = Path(__file__).parent
