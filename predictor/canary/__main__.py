"""`python -m predictor.canary` runs the canary tool (same as `qwen-vl-canary`)."""

from predictor.canary.cli import main

if __name__ == "__main__":
    main()
