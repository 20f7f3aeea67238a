"""FracTrain reproduced on real images: every recipe x seeds x data set, costed by the cost pass.

``fracpass demo`` and ``examples/fractrain_mnist.py`` run it. The package holds the data loaders
(``data``; Fashion-MNIST's idx files in ``fashion_mnist``), the networks (``model``), the recipes
and their shared settings (``recipes``), one training run (``runner``), the cost bookkeeping
(``accounting``), the comparison (``compare``), its table and results files (``table``), one
file per finished run (``runfiles``), the plots (``plots``) and a pilot timing of the long runs
(``pilot``).
"""
