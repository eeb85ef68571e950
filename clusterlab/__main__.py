import sys

from clusterlab.cli import main

sys.argv[0] = "clusterlab"  # `python -m clusterlab` reads as `clusterlab` in messages

main()
