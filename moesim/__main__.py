"""`python -m moesim <command> key=value ...`: the command line.

The first word names the command; the rest are Hydra overrides of that command's config
(`moesim/conf/<command>.yaml`). `--help` lists the commands; `python -m moesim` alone or an unknown command
lists them on stderr and exits with status 2;
`python -m moesim <command> --help` shows that command's config. User mistakes print one line
(`moesim: error: ...`) and exit with status 2; nothing is printed as a traceback.
"""
from __future__ import annotations

import importlib
import re
import sys

from .errors import EXTRAS, MoesimError, install_hint

# command -> (module:function taking the composed config, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("moesim.api:run_command", "replay a trace through one strategy and write a results directory"),
    "stats": ("moesim.stats:stats_command", "routing statistics of a trace (skew, entropy, reuse, layer correlation)"),
    "import": ("moesim.importers:import_command", "convert a foreign trace (gpt-oss-fingerprint, jsonl) to .moetrace.safetensors"),
    "calibrate": ("moesim.calibrate:calibrate_command", "measure this machine's copies and expert FFNs into a hardware profile for the sim"),
    "record": ("moesim.record:record_command", "record routing traces from a Hugging Face transformers MoE model"),
    "sweep": ("moesim.sweep:sweep_command", "a grid of runs (Hydra multirun, resumable): a results directory per cell, one table and report"),
    "report": ("moesim.report:report_command", "HTML report of one run, or comparison of a sweep or of several runs"),
    "validate": ("moesim.validate:validate_command", "replay published measurements of real offloading systems and report moesim's errors"),
    "baseline": ("moesim.baseline:baseline_command", "pin strategy results on a trace and check them in CI (write, check, project)"),
    "plan": ("moesim.plan:plan_command", "which strategy and how much VRAM for experts: every strategy x cache size, ranked"),
    "train-policy": ("moesim.train:train_policy_command", "train a learned eviction policy (strategy=learned) on part of a trace"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m moesim <command> [key=value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`python -m moesim <command> --help` shows a command's options and defaults."]
    return "\n".join(lines)


def command_help(command: str) -> str:
    """The command's config file as written (its comments explain each option) and the choices of its groups."""
    from importlib.resources import files

    usage = getattr(_function(command), "usage", None)
    if usage:  # a command without a config file of its own
        return f"python -m moesim {command}: {COMMANDS[command][1]}\n\n{usage.strip()}"
    conf = files("moesim.conf")
    text = conf.joinpath(f"{command}.yaml").read_text()
    lines = [f"python -m moesim {command} [key=value ...]: {COMMANDS[command][1]}", "",
             f"options and defaults (moesim/conf/{command}.yaml):", text.rstrip()]
    for group in sorted(p.name for p in conf.iterdir() if p.is_dir() and not p.name.startswith("_")):
        if f"{group}:" in text:
            names = sorted(f.name[:-5] for f in conf.joinpath(group).iterdir() if f.name.endswith(".yaml"))
            lines.append(f"{group}= one of: {', '.join(names)}")
    lines += [f"{key}= {what}" for key, what in _value_presets().items()  # where the option is a plain value
              if re.search(rf"^{key}:[ \t]*[^\s#]", text, re.M)]
    return "\n".join(lines)


def _value_presets() -> dict:
    """The named values of the options that are not config groups: hardware, host, trace, model, disk."""
    from .disk import STORAGE
    from .hardware import HOSTS, PRESETS
    from .importers import SHIPPED
    from .models import MODEL_SPECS
    from .synthetic import PRESETS as TRACES

    return {"hardware": f"a preset ({', '.join(PRESETS)}), <gpu>+<host> (hosts: {', '.join(HOSTS)}) or a profile "
                        "written by `calibrate` (.yaml)",
            "host": f"one of: {', '.join(HOSTS)}",
            "trace": f"a .moetrace.safetensors file, a foreign trace file or folder, a shipped real trace "
                     f"({', '.join(SHIPPED)}) or a synthetic preset ({', '.join(TRACES)})",
            "model": f"a preset ({', '.join(MODEL_SPECS)}) or a Hugging Face config.json",
            "disk": f"a storage preset ({', '.join(STORAGE)}; moesim/disk.py)"}


def compose(command: str, overrides: list[str]):
    """The resolved config of `command` with Hydra `overrides` applied (what tests call too)."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_module(config_module="moesim.conf", version_base="1.3"):
            cfg = hydra_compose(config_name=command, overrides=overrides)
        OmegaConf.resolve(cfg)  # a bad ${...} is an option error now, not a traceback later
        return cfg
    except (HydraException, OmegaConfBaseException, ValueError) as e:  # ValueError: Hydra on `=1`
        raise MoesimError(_plain(command, " ".join(str(e).split()), overrides)) from None


def _plain(command: str, msg: str, overrides: list[str]) -> str:
    """Hydra's message about a bad override, in the user's words: a misspelt key gets the nearest known one (not
    Hydra's "+key" append hint), an unknown choice the choices; Hydra's config search path is dropped."""
    import difflib
    import re

    msg = msg.split(" Config search path:")[0]
    m = re.search(r"Could not override '([^']+)'", msg)
    if m:
        key = m.group(1)
        parent, _, leaf = key.rpartition(".")
        known = _keys(command, parent, [o for o in overrides if o.split("=")[0].lstrip("+~") != key])
        near = difflib.get_close_matches(leaf, known, n=1, cutoff=0.6)
        hint = f"; did you mean {parent + '.' if parent else ''}{near[0]}=?" if near else ""
        where = f" of {parent}" if parent else ""
        listed = f"options{where}: {', '.join(sorted(k for k in known if not k.startswith('_')))}; " if known else ""
        return f"{command}: unknown option {key!r}{hint} ({listed}python -m moesim {command} --help)"
    m = re.search(r"Could not find '([^']+)/([^'/]+)'.*?Available options in '[^']+': (.*)$", msg)
    if m:
        group, name, options = m.group(1), m.group(2), m.group(3).split()
        if group == "hydra/launcher":  # joblib and submitit come with the sweep extra; others are Hydra plugins
            how = EXTRAS["hydra_plugins"] if name == "joblib" or name.startswith("submitit") else \
                f"a Hydra launcher plugin (pip install hydra-{name.split('_')[0]}-launcher, if there is one)"
            return f"{command}: {group}={name}: not installed (installed: {', '.join(options)}): {how}"
        near = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
        hint = f"; did you mean {group}={near[0]}?" if near else ""
        return f"{command}: {group}={name}: unknown{hint} (one of: {', '.join(options)})"
    return f"{command}: bad option: {msg}"


def _keys(command: str, parent: str, overrides: list[str]) -> list[str]:
    """The option names of `command`'s config (with the other `overrides`: they choose the groups) under the
    dotted `parent` ('' for the top level)."""
    from hydra import compose as hydra_compose, initialize_config_module
    from omegaconf import DictConfig

    from hydra.core.global_hydra import GlobalHydra

    try:
        if GlobalHydra.instance().is_initialized():  # inside a command's own Hydra context (sweep)
            node = hydra_compose(config_name=command, overrides=overrides)
        else:
            with initialize_config_module(config_module="moesim.conf", version_base="1.3"):
                node = hydra_compose(config_name=command, overrides=overrides)
        for part in filter(None, parent.split(".")):
            node = node.get(part)
        return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    except Exception:  # noqa: BLE001  only a hint: without it the message still names the key
        return []


def call(command: str, cfg):
    target, _ = COMMANDS[command]
    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)(cfg)


def _function(command: str):
    mod, fn = COMMANDS[command][0].split(":")
    return getattr(importlib.import_module(mod), fn)


def raw_args(command: str) -> bool:
    """True for a command that parses its own arguments (sweep: Hydra's multirun syntax `a,b`, which a
    single composition refuses; report: directories, not key=value): it gets them as given."""
    return bool(getattr(_function(command), "raw_args", False))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # no command: the usage, as an error (a script that forgot the command must not pass)
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"moesim: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        if any(a in ("-h", "--help") for a in rest):
            print(command_help(command))
            return 0
        rc = call(command, rest if raw_args(command) else compose(command, rest))
    except MoesimError as e:
        print(f"moesim: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an optional extra not installed: how to install it, not a traceback
        hint = install_hint(e)
        if hint is None:
            raise
        print(f"moesim: error: {command} needs {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moesim: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `python -m moesim ... | head`
        sys.stderr.close()
        return 0
    return rc if isinstance(rc, int) else 0  # e.g. `baseline check`: 1 when results changed


if __name__ == "__main__":
    sys.exit(main())
