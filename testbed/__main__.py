"""`python -m testbed --out DIR`: generate the testbed world (testbed/world.py)."""
from plumbing.common import run_main
from testbed.world import main

run_main(main)
