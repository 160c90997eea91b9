"""Write docs/cli.md, the reference of every `skeleton-ds` command and flag, from the parsers themselves.

    python launch/cli_reference.py            # rewrite docs/cli.md
    python launch/cli_reference.py --check    # exit 1 if docs/cli.md is stale (tests/test_docs.py does this)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from skeleton_ds.checkpoint import write_text  # noqa: E402
from skeleton_ds.cli import reference  # noqa: E402

TARGET = Path(__file__).resolve().parents[1] / "docs" / "cli.md"

if __name__ == "__main__":
    text = reference()
    if "--check" in sys.argv[1:]:
        stale = not TARGET.is_file() or TARGET.read_text() != text
        print(f"{TARGET}: {'stale: run python launch/cli_reference.py' if stale else 'up to date'}")
        sys.exit(1 if stale else 0)
    write_text(TARGET, text)
    print(f"wrote {TARGET}")
