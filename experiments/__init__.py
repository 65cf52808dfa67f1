"""One module per paper pipeline, each exposing `run(config, workdir)`."""
