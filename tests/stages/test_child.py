import os

from shm.naming import list_entries, new_run_id, segment_name
from shm.ring import Ring
from stages import child


def test_run_ids_are_found_wherever_a_config_names_an_object():
    config = {"region": "/rdp-aa11-12-ram", "dirty": {"kind": "log", "name": "/rdp-bb22-13-x"},
              "rings": ["/rdp-cc33-14-rruns", "not a name"], "run_id": "dd44", "port": 4}
    assert child.run_ids(config) == {"aa11", "bb22", "cc33", "dd44"}


def test_an_orphan_unlinks_its_own_objects_and_never_a_live_owners():
    rid = new_run_id()
    mine = Ring.create(segment_name(rid, "mine"), "<u8", 4)
    mine.close()
    # an object of the same run owned by a live process (the test's parent) stays
    theirs = Ring.create(segment_name(rid, "live", pid=os.getppid()), "<u8", 4)
    theirs.close()
    try:
        removed = child.release_orphan({"ring": mine.name})
        assert all(f"-{os.getpid()}-mine" in p for p in removed) and len(removed) == 3
        assert {e.name.kind for e in list_entries(rid)} == {"live", "live.items", "live.spaces"}
    finally:
        theirs.unlink()
