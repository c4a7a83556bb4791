"""The results file every script in ``experiments/`` writes, in one layout.

``RESULTS_DIR/NAME.md``: a title, the "Produced by" line, the exact commands, the
paragraphs that explain the table, the table, and the software versions; and, when
``data`` is given, ``RESULTS_DIR/NAME.json`` with the commands, versions and data.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from micronet_jax.app.train import package_versions


def write_report(results_dir: str, name: str, *, title: str, intro: str, commands: Sequence[str],
                 paragraphs: Sequence[str], table: str, after: Sequence[str] = (),
                 data: Any = None) -> str:
  """Writes the report and returns the markdown path. ``intro`` is the "Produced by ..."
  sentence that introduces the command block; ``after`` are paragraphs below the table."""
  versions = package_versions()
  md = [f"# {title}", "", intro, "", "```", *commands, "```", ""]
  for text in (*paragraphs, table, *after):
    md += [text, ""]
  md += ["Software: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
  os.makedirs(results_dir, exist_ok=True)
  path = os.path.join(results_dir, f"{name}.md")
  with open(path, "w") as f:
    f.write("\n".join(md))
  if data is not None:
    with open(os.path.join(results_dir, f"{name}.json"), "w") as f:
      json.dump({"commands": list(commands), "versions": versions, "results": data}, f, indent=2)
  print(f"\nwrote {path}")
  return path
