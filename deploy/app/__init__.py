"""The application: what runs the library for a user. `deploy build` (pipeline.py), `deploy bench`
(bench.py), the CI latency gate (gate/), the command line (cli/), the installation self-check,
the output folder a build owns and report.json's schema. It may import all of the library;
nothing in the library (deploy's other folders, backends/, models/) imports it."""
