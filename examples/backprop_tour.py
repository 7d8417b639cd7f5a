"""A live tour of backprop through tinyunet: python examples/backprop_tour.py [--help].

Part 1 checks each layer type's backward against central differences on a tiny input and
shows both gradients side by side; part 2 traces one training step of the U-Net (gradient
norms per layer, the two gradients at each skip, dead ReLUs, the loss before and after).
The logic lives in tinyunet/tour.py; tested by tests/test_tour.py.
"""
import sys

from tinyunet.tour import main

if __name__ == "__main__":
    sys.exit(main())
