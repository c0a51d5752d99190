"""A strict stand-in for rdma-core v44's pyverbs (tests only; see ``_strict``)."""

STRICT_DOUBLE = True
