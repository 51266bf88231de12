"""The repository as a whole: the README's commands, the installed package, ruff and mypy."""

from pathlib import Path


def test_readme_test_command_is_what_ci_runs():
    root = Path(__file__).resolve().parents[1]
    readme_commands = [line.strip().strip("`") for line in (root / "README.md").read_text().splitlines()[:12]
                       if line.strip().startswith(("python", "`python"))]
    assert len(readme_commands) == 2, readme_commands
    assert readme_commands[1] in (root / ".ci" / "run").read_text()


def test_installed_version_and_type_marker():
    import importlib.metadata
    import importlib.resources

    import jaxopt_lab

    assert importlib.metadata.version("jaxopt-lab") == jaxopt_lab.__version__
    assert importlib.resources.files("jaxopt_lab").joinpath("py.typed").is_file()  # PEP 561


def test_code_is_ruff_clean():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--quiet", str(root)],
                          capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_library_and_experiments_type_check():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "mypy"], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
