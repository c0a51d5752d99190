"""The strict double's ``pyverbs.pyverbs_error`` (messages and ``error_code`` as in v44)."""

import os


class PyverbsError(Exception):
    def __init__(self, msg, error_code=-1):
        super().__init__(msg)
        self.error_code = error_code


class PyverbsUserError(PyverbsError):
    pass


class PyverbsRDMAError(PyverbsError):
    def __init__(self, msg, error_code=-1):
        if error_code != -1:
            msg = f"{msg}. Errno: {error_code}, {os.strerror(abs(error_code))}"
        super().__init__(msg, error_code)
