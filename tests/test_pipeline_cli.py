"""`polyteacher pipeline` arguments (issue 14, case 11): --list-stages needs no run directory."""

from __future__ import annotations

from launch.cli import main


def test_list_stages_needs_no_out(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", "--list-stages"]) == 0
    assert "data" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_running_still_needs_out(capsys):
    assert main(["pipeline"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--out" in err
