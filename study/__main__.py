"""`python -m study`: the study (study/pipeline.py; `--help` lists its flags)."""
from plumbing.common import run_main
from study.pipeline import main

run_main(main)
