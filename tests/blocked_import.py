"""Run a snippet in a fresh interpreter where one package cannot be imported (an optional dependency
that is not installed, or the CUDA extension that was not built)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_without(package: str, body: str) -> subprocess.CompletedProcess:
    """Run ``body`` (dedented) in a fresh interpreter in which importing ``package`` or any of its
    submodules raises ``ImportError``; stdout and stderr are captured as text."""
    code = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, *a, **k):
                if name == {package!r} or name.startswith({package + "."!r}):
                    # what a missing module raises: torch's own probes (CUDA builds) catch this, not ImportError
                    raise ModuleNotFoundError('blocked', name=name)
        sys.meta_path.insert(0, Block())
        """
    ) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
