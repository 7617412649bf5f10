"""What importing a module loads, seen from a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys


def loaded_beyond_stdlib(module: str, already: str = "") -> set[str]:
    """Modules outside the standard library that ``import module`` loads in a new
    interpreter, besides those ``already`` (an import line run first) had loaded."""
    script = "\n".join(
        [
            "import json, sys",
            already,
            "before = set(sys.modules)",
            f"import {module}",
            "print(json.dumps(sorted(set(sys.modules) - before)))",
        ]
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    new: list[str] = json.loads(done.stdout)
    return {m for m in new if m.split(".")[0] not in sys.stdlib_module_names}
