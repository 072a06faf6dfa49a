"""The built-in testbed: a synthetic assistant world with a hidden gold reward (Gao et al. 2022's
setting).

- `testbed/gold.py`   the gold reward and its annotator: what the stages import (reporting, the
                      oracle's labels)
- `testbed/world.py`  the generator of the data files, the tokenizer and the tiny base model
                      (`python -m testbed`)
"""
