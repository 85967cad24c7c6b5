"""The installable package: pyproject.toml's dependency ranges admit the pinned versions, a wheel builds offline
with the library and the console scripts, and an editable install imports ``ramjax`` from any directory."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile

from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"ramjax-train": "ramjax.cli:train_main", "ramjax-sample": "ramjax.cli:sample_main",
           "ramjax-eval": "ramjax.cli:eval_main"}


def _project() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _pins(name: str) -> dict[str, str]:
    pins = {}
    with open(os.path.join(ROOT, name)) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if "==" in line:
                pkg, ver = line.split("==")
                pins[pkg.strip().lower().replace("_", "-")] = ver.strip()
    return pins


def _pip(*args: str, cwd: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_dependency_ranges_admit_the_pinned_versions():
    project = _project()
    runtime = [Requirement(r) for r in project["dependencies"]]
    test = [Requirement(r) for r in project["optional-dependencies"]["test"]]
    for reqs, pin_file in ((runtime, "requirements.txt"), (test, "requirements-test.txt")):
        pins = _pins(pin_file)
        for req in reqs:
            name = req.name.lower().replace("_", "-")
            if name in pins:
                assert req.specifier.contains(pins[name]), f"{req} excludes the pinned {name}=={pins[name]}"
                assert str(req.specifier) and "==" not in str(req.specifier), f"{req}: a range, not a pin"
        # every pinned run-time package is a declared dependency
        if pin_file == "requirements.txt":
            assert set(pins) <= {r.name.lower().replace("_", "-") for r in reqs}
    extras = project["optional-dependencies"]
    assert {"test", "data", "hub", "tpu", "cuda"} <= set(extras)
    assert any(Requirement(r).name == "datasets" for r in extras["data"])
    assert Requirement(extras["tpu"][0]).extras == {"tpu"} and Requirement(extras["cuda"][0]).extras == {"cuda12"}
    assert project["scripts"] == SCRIPTS


def test_wheel_builds_offline_with_the_library_and_console_scripts(tmp_path):
    src = tmp_path / "src"  # build from a copy: an in-tree build would leave build/ in the checkout
    shutil.copytree(os.path.join(ROOT, "ramjax"), src / "ramjax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp_path / "dist"), str(src),
         cwd=str(tmp_path))
    wheel, = (tmp_path / "dist").glob("ramjax-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        modules = {n for n in names if n.startswith("ramjax/") and n.endswith(".py")}
        want = {os.path.relpath(os.path.join(d, f), ROOT).replace(os.sep, "/")
                for d, _, fs in os.walk(os.path.join(ROOT, "ramjax")) if "__pycache__" not in d
                for f in fs if f.endswith(".py")}  # subpackages (ramjax/experiments) included
        assert modules == want  # the whole library, and nothing from tests/ or the scripts
        meta = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = z.read(meta).decode()
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in entry_points
        module, func = target.split(":")
        assert callable(getattr(__import__(module, fromlist=[func]), func))


def test_editable_install_imports_from_anywhere_and_runs_the_scripts(tmp_path):
    """A throwaway venv that sees the shared dependencies through a .pth file; nothing touches the test venv."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "shared_deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                           "-e", ROOT], cwd=str(tmp_path), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(py), "-c", "import ramjax; print(ramjax.__file__); print(ramjax.__version__)"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == os.path.join(ROOT, "ramjax", "__init__.py") and out[1] == _project_version()
    for script, marker in (("ramjax-train", "Train a model"), ("ramjax-sample", "Sample the aligned model"),
                           ("ramjax-eval", "ramjax-eval")):
        proc = subprocess.run([str(venv / "bin" / script), "--help"], cwd=elsewhere, env=env, capture_output=True,
                              text=True, timeout=300, check=False)
        assert proc.returncode == 0 and marker in proc.stdout, (script, proc.stderr[-2000:])
    # a bad option is a named error with exit status 2, not a traceback
    proc = subprocess.run([str(venv / "bin" / "ramjax-eval"), "no_such_key=1"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and "unknown config key" in proc.stderr and "Traceback" not in proc.stderr


def _project_version() -> str:
    import ramjax

    return ramjax.__version__
