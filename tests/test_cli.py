"""Tests of the command line dispatcher (moesim/__main__.py): listing, --help, bad options, exit codes.

    pytest tests/test_cli.py -q

The commands themselves (stats, import, run) are tested in their own files; here only the paths that
compose a config without running one, plus the error handling around a command, are exercised.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

import moesim.__main__ as cli
from moesim.__main__ import COMMANDS, compose, main
from moesim.errors import MoesimError, TraceError


def command_lines(text: str) -> dict[str, str]:
    """{command: its help} from the lines of `text` that list a command."""
    out = {}
    for line in text.splitlines():
        words = line.split(maxsplit=1)
        if len(words) == 2 and words[0] in COMMANDS and line.startswith("  "):
            assert words[0] not in out, f"{words[0]} listed twice"
            out[words[0]] = words[1]
    return out


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["help"]])
def test_lists_commands(capsys, argv):
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "usage: python -m moesim <command>" in out
    assert command_lines(out) == {name: help_ for name, (_, help_) in COMMANDS.items()}  # one line each


def test_no_command_is_an_error_with_the_usage(capsys):
    """A script that forgot the command must not pass: the usage on stderr, status 2."""
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "usage: python -m moesim <command>" in err and set(command_lines(err)) == set(COMMANDS)


@pytest.mark.parametrize("argv, expected", [
    (["run", "stratgy=lfu"], "run: unknown option 'stratgy'; did you mean strategy=?"),
    (["run", "prefetch=transition", "prefetch.lookhead=2"], "did you mean prefetch.lookahead=?"),
    (["run", "strategy=lfu", "strategy.cache.deccay=1"], "did you mean strategy.cache.decay=?"),
    (["run", "strategy=lruu"], "run: strategy=lruu: unknown; did you mean strategy=lru? (one of: activation_aware,"),
    (["run", "hardware=rtx-4090"], None),  # a good one composes
])
def test_misspelt_keys_and_choices_get_the_nearest(capsys, argv, expected):
    """Not Hydra's "To append to your config use +stratgy=lfu" or its config search path: the nearest name."""
    if expected is None:
        assert compose(argv[0], argv[1:]).hardware == "rtx-4090"
        return
    with pytest.raises(MoesimError) as e:
        compose(argv[0], argv[1:])
    msg = str(e.value)
    assert expected in msg and "+stratgy" not in msg and "append" not in msg and "search path" not in msg, msg


def test_unknown_command(capsys):
    assert main(["nosuchcommand", "x=1"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines()[0] == "moesim: unknown command 'nosuchcommand'"
    assert set(command_lines(err)) == set(COMMANDS)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_command_help_shows_config(capsys, flag):
    assert main(["stats", "json=true", flag]) == 0  # --help anywhere; shows defaults, not the overrides
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith(f"python -m moesim stats [key=value ...]: {COMMANDS['stats'][1]}")
    defaults = compose("stats", [])
    assert len(defaults) > 0
    for key in defaults:  # each option with its comment, as the config file has it
        assert f"\n{key}:" in out
    assert "# print JSON" in out or "#" in out.split("\ntrace:")[1].splitlines()[0]


def test_run_help_lists_group_choices(capsys):
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "strategy= one of:" in out and "lru" in out and "belady" in out
    assert "backend= one of:" in out and "sim" in out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_a_config(command):
    # a command listed without moesim/conf/<command>.yaml would fail only when a user calls it
    if getattr(cli._function(command), "usage", None):
        assert command in cli.command_help(command)  # parses its own arguments and has its own usage
        return
    try:
        compose(command, [])
    except MoesimError as e:
        pytest.fail(f"{command}: {e}")


def test_compose_applies_overrides():
    cfg = compose("stats", ["json=true", "trace=some/file.moetrace.safetensors"])
    assert cfg.json is True and cfg.trace == "some/file.moetrace.safetensors"


@pytest.mark.parametrize("override, words", [
    ("nosuchkey=1", ["nosuchkey"]),
    ("json", ["json"]),  # not key=value
    ("json=1=2", ["'='"]),
    ("json=[1,", ["[1,"]),  # unparsable value
    ("+json=1", ["json"]),  # appending a key that exists
    ("~nosuch", ["nosuch"]),
    ("trace@x=1", ["trace@x=1"]),
    ("=1", []),  # Hydra raises a plain ValueError here
])
def test_bad_override_is_one_line(capsys, override, words):
    assert main(["stats", override]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(("moesim: error: stats: bad option:", "moesim: error: stats: unknown option"))
    for w in words:
        assert w in lines[0]


def test_compose_raises_moesim_error():
    with pytest.raises(MoesimError, match="nosuchkey"):
        compose("stats", ["nosuchkey=1"])


def test_compose_rejects_unresolvable_interpolation():
    with pytest.raises(MoesimError, match="oops"):
        compose("stats", ["json=${oops}"])


def test_command_errors_become_exit_2(capsys, monkeypatch):
    seen = []

    def failing(command, cfg):
        seen.append((command, cfg.json))
        raise TraceError("traces/x.moetrace.safetensors: tensor 'step' decreases at token 4 (3 -> 2)")

    monkeypatch.setattr(cli, "call", failing)
    assert main(["stats", "json=true"]) == 2
    assert seen == [("stats", True)]  # the composed config with the override reached the command
    out, err = capsys.readouterr()
    assert err == "moesim: error: traces/x.moetrace.safetensors: tensor 'step' decreases at token 4 (3 -> 2)\n"


def test_interrupt_exits_130(capsys, monkeypatch):
    def interrupted(command, cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "call", interrupted)
    assert main(["stats"]) == 130
    assert capsys.readouterr().err == "moesim: interrupted\n"


def test_other_exceptions_are_not_hidden(monkeypatch):
    # a bug is not a user mistake: it must surface with its traceback, not as "moesim: error"
    def buggy(command, cfg):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(cli, "call", buggy)
    with pytest.raises(ZeroDivisionError):
        main(["stats"])


def test_module_entry_point():
    listing = subprocess.run([sys.executable, "-m", "moesim"], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 2, listing.stderr
    assert set(command_lines(listing.stderr)) == set(COMMANDS)
    bad = subprocess.run([sys.executable, "-m", "moesim", "stats", "nosuchkey=1"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.startswith("moesim: error: stats: unknown option 'nosuchkey'") and bad.stderr.count("\n") == 1


@pytest.mark.parametrize("argv, needs", [
    (["calibrate", "--help"], "calibrate needs torch, which is not installed: pip install -e \".[torch]\""),
    (["run", "backend=torch", "tokens=10", "progress=false"],
     "backend: moesim.backends.torch.TorchBackend needs torch, which is not installed: pip install -e \".[torch]\""),
])
def test_a_missing_extra_says_how_to_install_it(argv, needs):
    """Without torch (hidden here), the commands that need it print one line with the install command."""
    code = "import sys; sys.modules['torch'] = None; from moesim.__main__ import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"moesim: error: {needs}"), r.stderr


def test_progress_off_a_terminal_is_lines(monkeypatch, capsys):
    """stderr not a terminal (here: captured): each refresh a line of its own, not carriage returns."""
    import time as _time

    from moesim import progress as P

    monkeypatch.setattr(P, "LINE_EVERY_S", 0.0)
    for _ in P.progress(range(3), total=3, desc="replay", unit="step"):
        _time.sleep(0.01)
    err = capsys.readouterr().err
    assert "\r" not in err and len(err.splitlines()) >= 2 and "replay" in err and "3/3" in err.splitlines()[-1]
    for _ in P.progress(range(3), total=3, desc="quiet", enabled=False):
        pass
    assert capsys.readouterr().err == ""


def test_help_lists_the_presets_of_plain_options(capsys):
    """run --help names the hardware presets and hosts, the shipped and synthetic traces; plan's the models."""
    from moesim.hardware import HOSTS, PRESETS
    from moesim.models import MODEL_SPECS

    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    hw = next(line for line in out.splitlines() if line.startswith("hardware= "))
    assert all(name in hw for name in [*PRESETS, *HOSTS])
    assert "gpt-oss-20b" in next(line for line in out.splitlines() if line.startswith("trace= "))
    assert not any(line.startswith("model= ") for line in out.splitlines())  # run's model is a block of options
    assert main(["plan", "--help"]) == 0
    model = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model= "))
    assert all(name in model for name in MODEL_SPECS)


def test_a_launcher_that_is_not_installed_says_how():
    from moesim.__main__ import _plain

    hydra = ("In 'hydra/config': Could not find 'hydra/launcher/{}' Available options in 'hydra/launcher': "
             "basic Config search path: provider=hydra, path=pkg://hydra.conf")
    msg = _plain("sweep", hydra.format("joblib"), [])
    assert msg == 'sweep: hydra/launcher=joblib: not installed (installed: basic): pip install -e ".[sweep]"'
    assert "hydra-ray-launcher" in _plain("sweep", hydra.format("ray"), []) and "search path" not in msg
