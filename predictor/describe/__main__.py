"""`python -m predictor.describe` runs the batch captioning client."""

from predictor.describe.cli import main

if __name__ == "__main__":
    main()
