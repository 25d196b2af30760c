"""The README's Quickstart set-up commands and every ```python block, run as a user would: in a
fresh folder holding what those commands write (a tiny checkpoint ``tiny-pllava``, ``clip.mp4``)."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", TEXT, flags=re.S | re.M)


def _setup_commands() -> list[str]:
    """The bash block right after "Every Python block of this README runs as written"."""
    tail = TEXT.split("Every Python block of this README runs as written", 1)[1]
    block = re.search(r"^```bash\n(.*?)^```", tail, flags=re.S | re.M).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("readme")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    for command in _setup_commands():
        if command.startswith("python "):
            command = f'"{sys.executable}" ' + command[len("python "):]
        proc = subprocess.run(command, shell=True, cwd=path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"{command}: {proc.stderr[-2000:]}"
    assert (path / "tiny-pllava" / "config.json").is_file() and (path / "clip.mp4").is_file()
    return path


def test_readme_has_the_blocks():
    assert len(BLOCKS) >= 5 and any("VideoPipeline" in b for b in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_block_runs(index, folder, monkeypatch, capsys):
    monkeypatch.chdir(folder)
    code = compile(BLOCKS[index], f"README.md python block {index}", "exec")
    exec(code, {"__name__": f"readme_block_{index}"})
    assert capsys.readouterr().out.strip(), "every block prints what it shows"
