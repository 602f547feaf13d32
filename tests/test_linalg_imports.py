"""Importing the library stays light: pandas only when a table is built (issue 12, item 5)."""

import subprocess
import sys


def test_import_hessian_lab_does_not_import_pandas():
    code = "import hessian_lab, sys; assert 'pandas' not in sys.modules, 'pandas was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
