"""A strict stand-in for rdma-core v44's pyverbs (tests only; the rules are in ``_kernel``)."""

STRICT_DOUBLE = True
