"""The ``expertflow`` command line: ``main.py`` parses and runs the commands, ``predict.py`` adds
the predictor commands (record, train, eval), ``common.py`` holds the argument types and loaders
both use. Nothing here is imported by the library; the CLI imports the library and its tools."""
