from pyverbs._strict import CQ, WC, CompChannel  # noqa: F401
