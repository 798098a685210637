"""Print the README's configuration-reference table, generated from gigpo_rllib/config.py, or rewrite it in place.

    python3 scripts/config_reference.py                  # print the table
    python3 scripts/config_reference.py --update-readme  # replace the table in README.md
"""

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gigpo_rllib.config import markdown_reference, update_readme  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--update-readme", action="store_true", help="rewrite the table in README.md")
    if parser.parse_args().update_readme:
        update_readme(ROOT / "README.md")
    else:
        print(markdown_reference())
