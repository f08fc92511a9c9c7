"""`python -m metanlp ...` (and `torchrun ... -m metanlp train ...`): the `metanlp` command."""

from metanlp.cli import main

main()
