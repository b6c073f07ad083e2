"""``python -m chunkd.cli``: the same as the ``chunkd`` command."""

from chunkd.cli import main

main()
