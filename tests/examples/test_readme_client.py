"""README's "Python client in one minute" runs as written (endpoint swapped for the test server's)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from helpers import ServerProcess

ROOT = Path(__file__).resolve().parents[2]


def readme_client_program() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## The Python client in one minute", 1)[1].split("\n## ", 1)[0]
    (program,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return program


def test_readme_client_program_runs(shared_server: ServerProcess, tmp_path: Path) -> None:
    program = readme_client_program()
    assert '"127.0.0.1:2379"' in program
    script = tmp_path / "hello.py"
    script.write_text(program.replace('"127.0.0.1:2379"', repr(shared_server.endpoint)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("greeting = b'hello' at revision ")
    assert re.fullmatch(r"holding b'jobs/report/[0-9a-f]+' with fencing token \d+", lines[1]), lines
    assert re.fullmatch(r"elected; term \d+", lines[2]), lines
    assert len(lines) == 3
