from pyverbs._strict import SGE, RecvWR, SendWR  # noqa: F401
