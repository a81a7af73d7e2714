"""The console commands (seg/tools) in the fast tier: each ``main(argv)`` called in this process refuses a bad
argument at start with one line naming it and exit code 1. The same contracts in a process of their own, as a
user runs the tools, are the slow tier's (tests/test_script_options.py, tests/test_structure.py)."""

from __future__ import annotations

import importlib

import pytest

CASES = [  # (tool, arguments, the message's start)
    ("predict", ["colour=red"], "error: unexpected argument 'colour=red' (known: ckpt, input, output,"),
    ("evaluate", ["colour=red"], "error: unexpected argument 'colour=red' (known: pred, gt,"),
    ("export", ["colour=red"], "error: unexpected argument 'colour=red' (known: ckpt, output,"),
    ("summarize", ["{tmp}/no-sweep"], "error: {tmp}/no-sweep is not a folder"),
    ("prepare_data", ["lr=-1"], "error: lr=-1.0 is out of range: it must be in (0, inf)"),
]


@pytest.mark.parametrize("tool, arguments, message", CASES, ids=[case[0] for case in CASES])
def test_a_tool_refuses_a_bad_argument_in_one_line(tool, arguments, message, tmp_path, capsys):
    main = importlib.import_module(f"seg.tools.{tool}").main
    try:
        code = main([argument.format(tmp=tmp_path) for argument in arguments])
        printed = capsys.readouterr().err
    except SystemExit as exit_:  # sys.exit("error: ..."): the message on stderr, exit code 1
        code, printed = (1, f"{exit_.code}\n") if isinstance(exit_.code, str) else (exit_.code, capsys.readouterr().err)
    assert code == 1 and printed.startswith(message.format(tmp=tmp_path)), (code, printed)
    assert "Traceback" not in printed and list(tmp_path.iterdir()) == []
