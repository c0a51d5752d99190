"""The live line: it fits the terminal, keeps the most useful figures, and stays silent off
a terminal."""

import io

from pipeline.progress import Progress, progress_line

SNAP = {"status": "active", "round": 3, "total-time": 1234.0, "expected-downtime": 120.0,
        "ram": {"transferred": 412 << 20, "remaining": 37 << 20, "total": 512 << 20,
                "mbps": 2630.0, "average-mbps": 2000.0, "dirty-pages-rate": 12000}}


def test_the_line_fits_every_width_and_keeps_the_first_figures():
    full = progress_line(SNAP)
    assert "round 3" in full and "sent 412.0 MiB" in full and "2630 Mbit/s" in full
    for width in (20, 40, 60, 80, 120):
        line = progress_line(SNAP, width)
        assert len(line) <= width - 1
        assert line.startswith("active")
    assert "sent 412.0 MiB" in progress_line(SNAP, 60)


def test_a_destination_shows_what_it_can_count():
    rdma = {"status": "active", "total-time": 900.0, "ram": {"transferred": 0}}
    assert progress_line(rdma, destination=True) == "receiving: active  0.9 s"
    tcp = {**rdma, "ram": {"transferred": 3 << 20}}
    assert progress_line(tcp, destination=True) == "receiving: active  received 3.0 MiB  0.9 s"


def test_round_zero_shows_the_average_rate():
    snap = {**SNAP, "round": 0}
    assert "2000 Mbit/s" in progress_line(snap)


def test_nothing_is_drawn_off_a_terminal():
    out = io.StringIO()
    p = Progress(True, out)
    p(SNAP)
    p.done()
    assert out.getvalue() == ""


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_one_line_is_redrawn_and_ended_once():
    out = Tty()
    p = Progress(True, out)
    p({**SNAP, "status": "setup"})          # nothing moves yet
    assert out.getvalue() == ""
    p(SNAP)
    p(SNAP)
    p.done()
    text = out.getvalue()
    assert text.count("\r\x1b[K") == 2 and text.endswith("\n") and text.count("\n") == 1
    assert Progress(False, Tty()).enabled is False
