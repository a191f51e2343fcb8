"""`python -m predictor` starts the model server."""

from predictor.server.main import main

if __name__ == "__main__":
    main()
