"""Generated example data for the demo, the built-in models' pretraining and the tests."""
