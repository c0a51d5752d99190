"""The strict double's ``pyverbs.pyverbs_error``: messages and ``error_code`` as in v44 (only
PyverbsRDMAError carries a code; -1 means none; a code is appended to the message)."""

import os


class PyverbsError(Exception):
    def __init__(self, msg, error_code=-1):
        if error_code != -1:
            msg = f"{msg}. Errno: {error_code}, {os.strerror(error_code)}"
        super().__init__(msg)


class PyverbsRDMAError(PyverbsError):
    def __init__(self, msg, error_code=-1):
        super().__init__(msg, error_code)
        self._error_code = error_code

    @property
    def error_code(self):
        return self._error_code


class PyverbsUserError(PyverbsError):
    pass
