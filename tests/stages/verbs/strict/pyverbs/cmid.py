from pyverbs._strict import CMID, AddrInfo, CMEvent, CMEventChannel, ConnParam  # noqa: F401
