from pyverbs._strict import MR  # noqa: F401
