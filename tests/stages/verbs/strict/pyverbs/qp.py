from pyverbs._strict import QP, QPAttr, QPCap, QPInitAttr  # noqa: F401
