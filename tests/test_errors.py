import pytest

import pipeline
import pipeline.errors
from shm import errors


@pytest.mark.parametrize("cls", [errors.LocalProtocolError, errors.RemoteProtocolError,
                                 errors.TransportUnsupported, errors.ShmError,
                                 errors.GuestError, errors.MigrationCancelled])
def test_every_error_is_a_migration_error(cls):
    assert issubclass(cls, errors.MigrationError)


def test_hint_is_part_of_the_message():
    exc = errors.TransportError("no RDMA device", errno=38, hint="use --transport soft")
    assert str(exc) == "no RDMA device (use --transport soft)"
    assert exc.errno == 38


def test_stage_failed_says_how():
    assert "killed by signal 9" in str(errors.StageFailed("poster", -9))
    assert "exited with code 2" in str(errors.StageFailed("scanner", 2, "ring closed"))


def test_users_get_the_same_classes_from_pipeline_errors_and_pipeline():
    assert pipeline.errors.__all__ == errors.__all__
    for name in errors.__all__:
        assert getattr(pipeline.errors, name) is getattr(errors, name)
        assert getattr(pipeline, name) is getattr(errors, name)
