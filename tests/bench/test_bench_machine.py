"""The source digest recorded beside every benchmark result identifies the code that ran."""

from __future__ import annotations

import os

from bench.machine import source_digest


def _tree(root, files):
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)


def test_source_digest_tracks_code_and_ignores_caches_and_results(tmp_path):
    root = str(tmp_path)
    _tree(root, {"pygpo/a.py": "x = 1\n", "kernels/k.py": "y = 2\n", "csrc/e.cu": "int z;\n",
                 "setup.py": "", "bench/results/r.json": "{}"})
    base = source_digest(root)
    assert len(base) == 16 and int(base, 16) >= 0

    # caches, build products and recorded results are not code
    _tree(root, {"pygpo/__pycache__/a.cpython-312.pyc": "junk", "pygpo/_C.so": "bin",
                 "bench/results/new.json": "{}", "README.md": "docs"})
    assert source_digest(root) == base

    # an edit, a new source file and a rename each change it
    _tree(root, {"csrc/e.cu": "int z = 1;\n"})
    edited = source_digest(root)
    assert edited != base
    _tree(root, {"bench/extra.py": ""})
    assert source_digest(root) != edited
    os.rename(os.path.join(root, "bench/extra.py"), os.path.join(root, "bench/other.py"))
    renamed = source_digest(root)
    os.rename(os.path.join(root, "bench/other.py"), os.path.join(root, "bench/extra.py"))
    assert renamed != source_digest(root)
