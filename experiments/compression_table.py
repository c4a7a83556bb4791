"""micronet's compression table on Fashion-MNIST: the same code as ``micronet-jax table``.

    python experiments/compression_table.py --budget small      # 2 CPU cores
    python experiments/compression_table.py --budget full --seeds 3

Every row is a list of configs run through ``micronet_jax.app.pipelines`` (see
``micronet_jax.app.table``: the budgets, the rows and the steps); the table, its commands
and versions go to ``RESULTS_DIR/compression_table.md`` (with ``.json`` and a ``.png`` of
accuracy against model size).
"""

from __future__ import annotations

import argparse
import sys

from micronet_jax.app import table
from micronet_jax.app.errors import ConfigError


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  table.add_arguments(p)
  try:
    return table.main(p.parse_args())
  except ConfigError as e:
    print(f"compression_table.py: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
