from pyverbs._strict import PD  # noqa: F401
