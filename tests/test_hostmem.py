"""The command lines' host allocator settings (ramjax.hostmem): which environment they re-execute with, that a
program's entry point re-executes exactly once with it, and that in-process calls and the opt-out never do."""
import os
import subprocess
import sys

import pytest

from ramjax import hostmem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = [k for k, _ in hostmem.TUNABLES]


@pytest.fixture
def glibc(monkeypatch):
    monkeypatch.setattr(hostmem, "_is_glibc", lambda: True)


def test_adds_every_setting_when_none_is_set(glibc):
    env = hostmem.tuned_environment({"PATH": "/bin"})
    assert env["PATH"] == "/bin"
    assert env["GLIBC_TUNABLES"].split(":") == [f"{k}={v}" for k, v in hostmem.TUNABLES]


def test_keeps_the_users_values_and_adds_only_the_missing_ones(glibc):
    env = hostmem.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.cpu.x86_shstk=off"})
    items = env["GLIBC_TUNABLES"].split(":")
    assert items[:2] == ["glibc.malloc.arena_max=4", "glibc.cpu.x86_shstk=off"]
    assert [i.split("=")[0] for i in items[2:]] == KEYS
    own = hostmem.tuned_environment({"GLIBC_TUNABLES": f"{KEYS[0]}=0"})
    assert own is None  # the user's own value of our key wins: nothing added, no re-exec


def test_nothing_to_do_when_set_opted_out_or_not_glibc(glibc, monkeypatch):
    full = hostmem.tuned_environment({})
    assert hostmem.tuned_environment(full) is None  # already re-executed: no loop
    for off in ("0", "false", "off"):
        assert hostmem.tuned_environment({hostmem.OPT_OUT: off}) is None
    assert hostmem.tuned_environment({hostmem.OPT_OUT: "1"}) is not None
    monkeypatch.setattr(hostmem, "_is_glibc", lambda: False)
    assert hostmem.tuned_environment({}) is None


def _run_entry(tmp_path, extra_env):
    script = tmp_path / "entry.py"
    script.write_text("import os, sys\n"
                      "print('TUNABLES', os.environ.get('GLIBC_TUNABLES'), os.getpid(), flush=True)\n"
                      "from ramjax import cli\n"
                      "sys.exit(cli.train_main())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.OPT_OUT)}
    env.update(extra_env, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, str(script), "--help"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [ln.split() for ln in out.stdout.splitlines() if ln.startswith("TUNABLES")]
    assert "python train.py" in out.stdout  # the help text: the command itself ran after the re-exec
    return lines


@pytest.mark.skipif(not hostmem._is_glibc(), reason="glibc only")
def test_a_program_entry_point_reexecutes_once_with_the_settings(tmp_path):
    lines = _run_entry(tmp_path, {})
    assert len(lines) == 2, lines  # started, then re-executed once (not again: the settings are there)
    assert lines[0][1] == "None"
    assert lines[1][1] == hostmem.tuned_environment({})["GLIBC_TUNABLES"]
    assert lines[0][2] == lines[1][2]  # the same process (signals and run-dir locks still reach it)


@pytest.mark.skipif(not hostmem._is_glibc(), reason="glibc only")
def test_opt_out_keeps_the_process_as_started(tmp_path):
    lines = _run_entry(tmp_path, {hostmem.OPT_OUT: "0"})
    assert len(lines) == 1 and lines[0][1] == "None"


def test_in_process_calls_never_reexecute(monkeypatch, capsys):
    from ramjax import cli

    def boom(*a, **k):
        raise AssertionError("execve called from an in-process call")

    monkeypatch.setattr(os, "execve", boom)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert cli.train_main(["--help"]) == 0
    assert "python train.py" in capsys.readouterr().out


def test_a_failed_reexec_carries_on_as_started(glibc, monkeypatch, caplog):
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "execve", denied)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(hostmem.OPT_OUT, raising=False)
    hostmem.maybe_reexec(["python", "train.py"])  # returns instead of raising
    assert "could not re-execute" in caplog.text and "Permission denied" in caplog.text


def test_the_lazy_package_exports_every_public_name_and_nothing_else():
    """``ramjax/__init__`` lists its public names three times (``__all__`` for tools, ``_EXPORTS`` for the lazy
    import, the TYPE_CHECKING imports for type checkers): the first two must agree and every name must resolve to
    the object of the module it is said to come from."""
    import importlib

    import ramjax

    assert sorted(ramjax.__all__) == sorted(ramjax._EXPORTS)
    for name, module in ramjax._EXPORTS.items():
        assert getattr(ramjax, name) is getattr(importlib.import_module(module), name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ramjax.nope  # noqa: B018
