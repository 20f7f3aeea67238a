"""The example models, kept importable as ``examples.models`` (and ``--model examples.models:resnet20``).

They live in ``fracpass.models``, installed with the package, so the README's examples run from any
folder; this module re-exports them.
"""
from fracpass.models import *  # noqa: F401,F403
from fracpass.models import __all__  # noqa: F401
from fracpass.models import BasicBlock, EncoderLayer, InvertedResidual, SelfAttention  # noqa: F401
