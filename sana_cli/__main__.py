"""`python -m sana_cli` (and `accelerate launch -m sana_cli`) runs the CLI."""

from .cli import main

if __name__ == "__main__":
    main()
