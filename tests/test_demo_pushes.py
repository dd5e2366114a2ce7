"""The push tour runs end to end: every kind reaches both phones through the dispatcher."""

from __future__ import annotations

import pytest

from harness import demo_pushes


def test_push_tour_delivers_every_kind(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_pushes.main() == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "demo: 14 pushes delivered through the dispatcher to the sandbox"
    lines = out[:-1]
    for kind in demo_pushes.SAMPLE_DATA:
        assert sum(1 for line in lines if f" {kind.value} " in line) == 2, kind
    assert any("incomingCall" in line and "push-type=voip" in line for line in lines)
    assert any("registrationRefresh" in line and "push-type=background priority=5" in line for line in lines)
