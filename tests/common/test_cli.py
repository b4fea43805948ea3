"""The ``onfh`` prefix: lists its verbs, refuses unknown ones, and dispatches."""

from common.cli import VERBS, main


def test_help_lists_every_verb(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for verb in VERBS:
        assert verb in out


def test_unknown_verb_is_refused(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_dispatch_reaches_the_verb(capsys, tmp_path):
    # `onfh check` on a missing folder: a one-line message and exit code 1, no traceback.
    assert main(["check", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err
