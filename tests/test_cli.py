"""What every script's command line promises (issue 18): nonsense counts refused with one line
naming the flag, every default shown once in --help, run folders that belong to one script."""
import argparse
import importlib
import json

import pytest

from tests.conftest import REPO, run_main, run_script

SCRIPTS = [s for s in ("simclr", "moco", "byol", "densecl", "pcl", "detcon", "concl", "mcl",
                       "pixcon", "finetune_maskrcnn", "linear_probe") if (REPO / f"{s}.py").exists()]


class _Captured(Exception):
    pass


def parser_of(script, monkeypatch):
    """The argparse parser a script's get_args() builds (caught as it starts parsing)."""
    module = importlib.import_module(script)

    def grab(self, *a, **k):
        raise _Captured(self)
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", grab)
        with pytest.raises(_Captured) as caught:
            module.get_args()
    return caught.value.args[0]


def options(parser):
    return [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS
            and not isinstance(a, argparse._HelpAction)]


def numeric(action):
    return (action.type in (int, float) or getattr(action.type, "__module__", "") == "common.cli"
            or (isinstance(action.default, (int, float)) and not isinstance(action.default, bool)))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default_once(script, monkeypatch):
    parser = parser_of(script, monkeypatch)
    text = parser.format_help()
    assert "(default: None)" not in text
    formatter = parser._get_formatter()
    for a in options(parser):
        shown = formatter._expand_help(a) if a.help is not None else ""
        if a.default is not None and a.default is not False:  # 0 (e.g. --seed) is a default
            assert "default" in shown.lower(), f"{script} {a.option_strings[0]}: no default shown"
        assert shown.lower().count("(default") <= 1, f"{script} {a.option_strings[0]}: {shown}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_count_flag_refuses_what_cannot_be_meant(script, monkeypatch, capsys):
    parser = parser_of(script, monkeypatch)
    checked = 0
    for a in options(parser):
        if not numeric(a) or a.choices:
            continue
        flag = a.option_strings[0]
        assert a.type not in (int, float), f"{script} {flag}: plain {a.type.__name__} accepts nonsense"
        # a count of 0 where 0 cannot be meant, and a negative anywhere
        bad = ["-1"] + (["0"] if ">= 1" in a.type.__name__ or "> 0" in a.type.__name__ else [])
        for value in bad:
            with pytest.raises(SystemExit) as e:
                n = a.nargs if isinstance(a.nargs, int) else 1
                parser.parse_args([flag] + [value] * n)
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert e.value.code == 2 and flag in err and value in err, (script, flag, err)
        checked += 1
    assert checked >= 3
    for flag in ("--epochs", "--batch-size", "--img-size", "--runs", "--probe-epochs",
                 "--max-iters", "--queue-size"):
        if any(flag in a.option_strings for a in options(parser)):
            with pytest.raises(SystemExit):
                parser.parse_args([flag, "0"])
    capsys.readouterr()


def test_epochs_zero_is_one_line_and_no_folder(tmp_path, monkeypatch, capsys):
    code, err = run_main("moco.py", ["--data", "demo", "--epochs", "0", "--output-dir",
                                     tmp_path / "r"], monkeypatch, capsys)  # in this process
    assert code == 2 and not (tmp_path / "r").exists()
    assert err.strip().splitlines()[-1] == \
        "moco.py: error: argument --epochs: expected a whole number >= 1, got '0'"


TINY = ["--data", "demo", "--demo-size", "16", "--batch-size", "8", "--img-size", "64",
        "--queue-size", "16", "--workers", "0", "--epochs", "1", "--knn-every", "0"]


def test_a_run_folder_belongs_to_the_script_that_made_it(tmp_path, monkeypatch, capsys):
    run_script("moco.py", *TINY, "--output-dir", tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / "args.json").read_text())["script"] == "moco"
    # the refusals in this process (conftest.run_main): the same __main__, no import per case
    code, err = run_main("concl.py", [*TINY, "--output-dir", tmp_path], monkeypatch, capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == \
        f"error: {tmp_path} holds a moco run; choose another --output-dir"
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing touched
    old = tmp_path.parent / (tmp_path.name + "-old")  # a folder from before the record existed
    old.mkdir()
    (old / "args.json").write_text(json.dumps({"arch": "resnet18"}))
    code, err = run_main("moco.py", [*TINY, "--output-dir", old], monkeypatch, capsys)
    assert code == 2 and "predates this version" in err
