"""``python -m bittune`` (also what ``accelerate launch -m bittune`` runs)."""

from bittune.cli import main

if __name__ == "__main__":
    main()
