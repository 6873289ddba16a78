"""The command layer: one module per `edge-ft` subcommand (argument parsing, flag names, printing).

The library (everything else under edge_ft/) never imports it.
"""
