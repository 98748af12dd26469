"""`python -m fastdino ...` = the `fastdino` command (for environments where the console script
is not on PATH, e.g. a venv that is not activated)."""

from fastdino.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
