"""FracTrain reproduced on real images: every recipe x seeds x data set, costed by the cost pass.

``fracpass demo`` and ``examples/fractrain_mnist.py`` run it. The package holds the data loaders
(``data``), the network (``model``), the recipes and their shared settings (``recipes``), one
training run (``runner``), the cost bookkeeping (``accounting``), the comparison and its table
(``compare``) and the plots (``plots``).
"""
